"""Exceptions raised by the edge runtime.

Every message is written for the radiology IT admin who reads the log or the
``.error.json`` next to a quarantined scan: it says what failed, on which
object (a file name or a DICOM UID, never patient data), and what to do.

The tree::

    EdgeRuntimeError
    ├── ConfigError            configuration file / environment is invalid
    ├── InputError             one scan cannot be used (it is quarantined)
    │   ├── IncompleteInput         file vanished or is still being written
    │   ├── NotAnImage              neither DICOM nor a supported image format
    │   ├── CorruptImage            truncated or undecodable pixel data
    │   ├── UnsupportedTransferSyntax  no installed decoder handles it
    │   ├── UnsupportedImage        decodes, but cannot be fed to the model
    │   ├── OutsideIntendedUse      header says it is not what the model is for
    │   ├── DecodeTimeout           the decoder hung on it (stopped after a limit)
    │   ├── DecodeCrashed           the decoder died or ran out of memory on it
    │   ├── NotARegularFile         a FIFO, device or socket (never opened)
    │   ├── SymlinkRefused          a link (never followed unless configured)
    │   ├── UnreadableFile          the service user may not read it
    │   ├── FileTooLarge            over Inbox.MaxFileMb or too slow to read
    │   └── ImageTooLarge           dimensions exceed the configured cap
    ├── ModelBundleError       model bundle missing, tampered or inconsistent
    │   └── ConformanceError        the model answers differently on this CPU
    ├── DecoderFault           our own decoding code failed (a bug; retried, then quarantined)
    ├── BackendError           inference engine failed to load or run
    │   └── EngineNotInstalled      the engine's Python package is not installed here
    ├── PublishError           a sink (MQTT, Greengrass IPC) did not take a message
    └── JournalError           the on-disk journal cannot be read or written
        └── JournalIntegrityError   journal missing, empty, replaced or damaged: start refused

``InputError`` subclasses are the only ones the service turns into a
quarantine record; everything else is an operational fault of the box itself.
Errors of the libraries we use (paho, sqlite3, onnxruntime, the Greengrass
IPC client) are translated into these where they cross into our code, so a
caller catches one tree and an admin reads one kind of message.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "ConformanceError",
    "CorruptImage",
    "DecodeCrashed",
    "DecodeTimeout",
    "DecoderFault",
    "EdgeRuntimeError",
    "EngineNotInstalled",
    "FhirReportError",
    "FileTooLarge",
    "ImageTooLarge",
    "IncompleteInput",
    "InputError",
    "JournalError",
    "JournalIntegrityError",
    "ModelBundleError",
    "NotARegularFile",
    "NotAnImage",
    "OutsideIntendedUse",
    "PublishError",
    "ReportError",
    "ReportSourceError",
    "SymlinkRefused",
    "UnreadableFile",
    "UnsupportedImage",
    "UnsupportedTransferSyntax",
]


class EdgeRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""

    #: Short machine-readable code, stable across releases (used in error files).
    code = "edge_runtime_error"
    #: What the admin should do about it; subclasses override.
    action = "See the service log for details."

    def __init__(self, message: str, *, action: str | None = None) -> None:
        super().__init__(message)
        if action is not None:
            self.action = action

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def to_dict(self) -> dict[str, str]:
        """The JSON shape written to ``.error.json`` files and status topics."""
        return {"code": self.code, "error": self.message, "action": self.action}


class ConfigError(EdgeRuntimeError):
    """The configuration file or an environment override is invalid."""

    code = "config_invalid"
    action = "Fix the named setting and start the service again."


class InputError(EdgeRuntimeError):
    """One input file cannot be processed; it goes to quarantine, the service goes on."""

    code = "input_invalid"
    action = "Check the file at the sending device; resend it if it was damaged in transit."


class IncompleteInput(InputError):
    """The file disappeared or changed while it was being read."""

    code = "input_incomplete"
    action = (
        "The file was still being written or was removed. Senders should write to NAME.part "
        "and rename when done; resend the scan."
    )


class NotAnImage(InputError):
    """The file is neither DICOM nor a supported image format."""

    code = "not_an_image"
    action = "Only DICOM, PNG and JPEG files belong in the inbox; remove other files."


class CorruptImage(InputError):
    """The file claims to be an image but its content is damaged or truncated."""

    code = "corrupt_image"
    action = "The file is damaged or truncated. Resend it from the modality or PACS."


class UnsupportedTransferSyntax(InputError):
    """No installed DICOM pixel decoder handles this transfer syntax."""

    code = "unsupported_transfer_syntax"


class UnsupportedImage(InputError):
    """The image decodes but cannot be used (no pixels, wrong kind of image, ...)."""

    code = "unsupported_image"
    action = "This kind of DICOM object is not an image the model can read; no action needed."


class OutsideIntendedUse(InputError):
    """The scan's header says it is not what the model is meant for."""

    code = "outside_intended_use"


class DecodeTimeout(InputError):
    """Decoding took longer than Decode.TimeoutSeconds; the decoder was stopped."""

    code = "decode_timeout"
    action = (
        "The file made the decoder hang (it is probably malformed). Resend it; if a valid "
        "scan needs longer, raise Decode.TimeoutSeconds."
    )


class DecodeCrashed(InputError):
    """The decoder process died or ran out of its memory allowance on this file."""

    code = "decode_crashed"
    action = (
        "The file crashed the decoder or needed more memory than Decode.MemoryLimitMb allows. "
        "Resend it; if it is a valid (very large) scan, raise Decode.MemoryLimitMb."
    )


class NotARegularFile(InputError):
    """A FIFO, device, socket or folder in the inbox: never opened for reading."""

    code = "not_a_regular_file"
    action = (
        "Only regular files belong in the inbox. Remove this entry from quarantine; if a program "
        "creates pipes or devices in the inbox, point it elsewhere."
    )


class SymlinkRefused(InputError):
    """A symbolic link in the inbox: not followed, so no file outside the inbox is ever read."""

    code = "symlink_refused"
    action = (
        "Copy the scan itself into the inbox instead of linking to it. To follow links that stay "
        "inside the inbox, set Inbox.Symlinks to inside-inbox."
    )


class UnreadableFile(InputError):
    """The service user may not read the file (permissions)."""

    code = "file_unreadable"
    action = (
        "Give the service's user read access to files the sender writes (e.g. the sender's umask or a "
        "shared group), then move the file from quarantine back into the inbox."
    )


class FileTooLarge(InputError):
    """The file is larger than Inbox.MaxFileMb or could not be read within Inbox.ReadTimeoutSeconds."""

    code = "file_too_large"
    action = (
        "No chest radiograph is this large: check what was sent. If such files are expected, raise "
        "Inbox.MaxFileMb / Inbox.ReadTimeoutSeconds."
    )


class ImageTooLarge(InputError):
    """The declared image dimensions exceed the configured pixel cap."""

    code = "image_too_large"
    action = (
        "The image is larger than Decode.MaxPixels allows (a guard against decompression "
        "bombs). Raise the limit only if this size is expected from your modality."
    )


class ModelBundleError(EdgeRuntimeError):
    """The model bundle is missing, altered, or does not match its manifest."""

    code = "model_bundle_invalid"
    action = "Redeploy the model component (or point Model.BundlePath at a valid bundle)."


class ConformanceError(ModelBundleError):
    """The model computes different answers on this CPU than where it was validated."""

    code = "model_conformance_failed"
    action = (
        "Do not use this model on this box: deploy a model version whose conformance check passes "
        "on this CPU (the model's release notes list the CPUs it was checked on), or choose another "
        "backend in Model.Backend. The previous model stays active."
    )


class DecoderFault(EdgeRuntimeError):
    """The runtime's own decoding code raised an unexpected error: a bug, not the file's fault."""

    code = "decoder_fault"
    action = (
        "A fault of the runtime: send the service log (it has the error) to support. The scan is "
        "tried again and quarantined after Journal.MaxAttempts; resend it once the runtime is fixed."
    )


class BackendError(EdgeRuntimeError):
    """The inference engine could not load the model or run it."""

    code = "backend_failed"
    action = "Check that the inference engine named in Model.Backend is installed."


class EngineNotInstalled(BackendError):
    """The engine's Python package cannot be imported on this box (an optional extra not installed)."""

    code = "backend_not_installed"


class PublishError(EdgeRuntimeError):
    """A sink did not take a message; it stays in the outbox and is offered again."""

    code = "publish_failed"
    action = (
        "Check that the MQTT broker (or the Greengrass nucleus) is running and reachable with the "
        "configured settings; results wait in the journal meanwhile."
    )


class ReportError(EdgeRuntimeError):
    """A report (SR, FHIR, heat-map) could not be built; the result is still published without it."""

    code = "report_failed"
    action = "The result was published without this report; send the service log to HealthDiag support."


class ReportSourceError(ReportError):
    """The scan's DICOM header lacks what a report about it must reference."""

    code = "report_source_invalid"
    action = (
        "Check that the modality fills Study, Series and SOP Instance UIDs in its images: "
        "a report cannot reference an image without them."
    )


class FhirReportError(ReportError):
    """The FHIR resources built from an SR failed FHIR validation (a defect, not a site problem)."""

    code = "fhir_report_invalid"
    action = "This is a defect in edge-runtime: send the service log to HealthDiag support."


class JournalError(EdgeRuntimeError):
    """The SQLite journal could not be opened, read or written.

    The journal module sets an ``action`` that matches the cause (disk full,
    permissions, a lock, an I/O error); this default is for the rest.
    """

    code = "journal_failed"
    action = "Run 'edge-runtime journal check' for a diagnosis; the service log has the SQLite error."


class JournalIntegrityError(JournalError):
    """The journal is not the one this box wrote: missing, empty, replaced or damaged.

    Starting anyway would silently drop the results it still had to deliver, so the
    service refuses; the admin restores a backup or starts over explicitly.
    """

    code = "journal_integrity"
    action = (
        "Stop the service. Restore the journal from your latest backup (made with 'edge-runtime "
        "journal backup') and start again; or start over with 'edge-runtime run --new-journal', "
        "which moves the old files aside (nothing is deleted): results not yet delivered in them "
        "are then NOT sent."
    )
