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
    │   ├── ImageTooLarge           dimensions exceed the configured cap
    │   └── InvalidDicomUid         a Study/Series/SOP UID that is not a DICOM UID
    ├── ModelBundleError       model bundle missing, tampered or inconsistent
    │   └── ConformanceError        the model answers differently on this CPU
    ├── DecoderFault           our own decoding code failed (a bug; retried, then quarantined)
    ├── InputChanged           the file changed between its hash and its decode (retried)
    ├── BackendError           inference engine failed to load or run
    │   └── EngineNotInstalled      the engine's Python package is not installed here
    ├── PublishError           a sink (MQTT, Greengrass IPC) did not take a message
    ├── ReportError            a report (SR, FHIR, heat-map) could not be built; the result stands
    │   ├── ReportSourceError       the header lacks a UID a report must reference
    │   ├── FhirReportError         the FHIR resources failed validation
    │   ├── ReportTimeout           the report process took too long
    │   ├── ReportProcessCrashed    the report process died
    │   └── ReportDiskFull          Reports.Path's file system is full (reports paused)
    └── JournalError           the on-disk journal cannot be read or written
        ├── JournalIntegrityError   journal missing, empty, replaced or damaged: start refused
        │   └── JournalLost             deleted or replaced while the service ran: writes refused
        └── JournalInUse            another service instance holds the journal's lock

``InputError`` subclasses are the only ones the service turns into a
quarantine record; everything else is an operational fault of the box itself.
Errors of the libraries we use (paho, sqlite3, onnxruntime, the Greengrass
IPC client) are translated into these where they cross into our code, so a
caller catches one tree and an admin reads one kind of message.

**What leaves the box.** An exception's text may quote what the input held (a
header value can hold a patient's name; a library's message quotes it), so it
goes only to the service log. Every message that leaves the process (the
result's ``reports.error``, the status' ``last_error``, the health file, the
IoT Core payloads) says the error's ``code`` and :func:`public_text` for it:
a fixed, reviewed sentence from :data:`PUBLIC_TEXTS`, with no value in it.
"""

from __future__ import annotations

import re

__all__ = [
    "MQTT_AUTH_FAILED",
    "MQTT_CLIENT_ID_CONFLICT",
    "MQTT_CONNECTION_REFUSED",
    "MQTT_TLS_HANDSHAKE_FAILED",
    "MQTT_TLS_VERIFY_FAILED",
    "PUBLIC_TEXTS",
    "UNEXPECTED_ERROR",
    "AdminActionRefused",
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
    "InputChanged",
    "InputError",
    "InvalidDicomUid",
    "JournalError",
    "JournalInUse",
    "JournalIntegrityError",
    "JournalLost",
    "ModelBundleError",
    "NotARegularFile",
    "NotAnImage",
    "OutsideIntendedUse",
    "PublishError",
    "ReportDiskFull",
    "ReportError",
    "ReportProcessCrashed",
    "ReportSourceError",
    "ReportTimeout",
    "SymlinkRefused",
    "UnreadableFile",
    "UnsupportedImage",
    "UnsupportedTransferSyntax",
    "code_in_line",
    "public_code",
    "public_text",
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


class InvalidDicomUid(InputError):
    """A Study, Series, SOP Instance or SOP Class UID in the header is not a DICOM UID (PS3.5 §9.1)."""

    code = "invalid_dicom_uid"
    action = (
        "The sending device writes UIDs that are not valid DICOM UIDs (digits and dots, no leading "
        "zeros, at most 64 characters): results and reports could not be tied to the image. Have "
        "the device's configuration corrected, then resend the scan."
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


class InputChanged(EdgeRuntimeError):
    """The file's content changed after it was hashed: what would be decoded is not what was admitted.

    Not the file's fault, and not quarantined: the attempt ends, the file stays in
    the inbox, and its new content is hashed and admitted as new work when it is
    offered again.
    """

    code = "input_changed"
    action = (
        "Make the sender write each scan under a temporary name (NAME.part) and rename it when "
        "complete, and never rewrite a file in the inbox; the scan is tried again."
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


class ReportTimeout(ReportError):
    """The report process took longer than its limit; replaced, the result published without reports."""

    code = "report_timeout"
    action = (
        "The result was published without its reports; if this repeats, send the service log "
        "and the scan's reference to HealthDiag support."
    )


class ReportProcessCrashed(ReportError):
    """The report process died (crashed or killed); replaced, the result published without reports."""

    code = "report_process_crashed"
    action = ReportTimeout.action


class ReportDiskFull(ReportError):
    """Reports.Path's file system is full (ENOSPC or a quota); the result is published without reports.

    Reports are not tried again for each scan while it stays full: they resume by
    themselves once enough space is free (:mod:`edge_runtime.reports.processes`).
    """

    code = "disk_full"
    action = (
        "Free space on the file system that holds Reports.Path (e.g. remove old report folders, lower "
        "Reports.KeepDays, or give Reports.Path a larger volume). Reports resume by themselves once "
        "space is free; results are published meanwhile, without reports."
    )


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


class JournalLost(JournalIntegrityError):
    """The journal file (or its id file) was deleted or replaced while the service ran.

    The service still holds the old file open, so SQLite would go on writing into a
    file nobody can open again; every write that would let a scan leave its source
    is refused instead, and intake is paused until the admin restarts the service.
    """

    code = "journal_lost"


class JournalInUse(JournalError):
    """Another edge-runtime service already runs with this journal (it holds the lock)."""

    code = "journal_in_use"
    action = (
        "Stop the other service first (its PID is in the message), or give this one its own "
        "Journal.Path and Mqtt.ClientId."
    )


class AdminActionRefused(EdgeRuntimeError):
    """An admin page action that cannot be done as asked (the file was retried or discarded meanwhile)."""

    code = "admin_action_refused"
    action = "Reload the page: the file may have been retried or discarded meanwhile."


#: Codes of errors that are not exceptions of this tree (a dict written by the workers) or not ours.
UNEXPECTED_ERROR = "unexpected_error"

#: Why the MQTT broker is not reachable (not exceptions: paho reports them to callbacks).
MQTT_AUTH_FAILED = "mqtt_auth_failed"
MQTT_CONNECTION_REFUSED = "mqtt_connection_refused"
MQTT_TLS_VERIFY_FAILED = "mqtt_tls_verify_failed"
MQTT_TLS_HANDSHAKE_FAILED = "mqtt_tls_handshake_failed"
MQTT_CLIENT_ID_CONFLICT = "mqtt_client_id_conflict"

#: The fixed text each code carries in messages that leave the process. Reviewed: no value from a
#: scan, a file name, a configuration or an exception is ever formatted into one. Codes missing
#: here fall back to their class's parent's text, then to :data:`UNEXPECTED_ERROR`'s.
PUBLIC_TEXTS: dict[str, str] = {
    "edge_runtime_error": "the edge runtime could not complete a step",
    UNEXPECTED_ERROR: "an unexpected error occurred (a fault of the runtime)",
    "config_invalid": "the configuration is invalid",
    "admin_action_refused": "an admin page action could not be done",
    "input_invalid": "the scan cannot be processed; it was quarantined",
    "input_incomplete": "the scan was still being written or was removed while it was read; "
    "it was quarantined",
    "not_an_image": "the file is neither DICOM nor a supported image format; it was quarantined",
    "corrupt_image": "the image is damaged or truncated; it was quarantined",
    "unsupported_transfer_syntax": "no installed decoder handles the scan's transfer syntax; "
    "it was quarantined",
    "unsupported_image": "the DICOM object is not an image the model can read; it was quarantined",
    "outside_intended_use": "the scan's header puts it outside the model's intended use; it was not analysed",
    "decode_timeout": "decoding the scan took too long; it was quarantined",
    "decode_crashed": "the decoder crashed or ran out of memory on the scan; it was quarantined",
    "not_a_regular_file": "a pipe, device or socket was in the inbox; it was quarantined unread",
    "symlink_refused": "a symbolic link was in the inbox; it was quarantined unfollowed",
    "file_unreadable": "the service may not read the file; it was quarantined",
    "file_too_large": "the file is over the size or read-time limit; it was quarantined",
    "image_too_large": "the image is over the pixel limit; it was quarantined",
    "invalid_dicom_uid": "the scan's header carries a UID that is not a valid DICOM UID; it was quarantined",
    "processing_failed_repeatedly": "the scan failed repeatedly without a result; it was quarantined",
    "processing_interrupted_repeatedly": "the service stopped repeatedly while processing the scan; "
    "it was quarantined",
    "model_bundle_invalid": "the model bundle is missing, altered or inconsistent",
    "model_conformance_failed": "the model computes different answers on this CPU",
    "decoder_fault": "the runtime's decoding code failed (a fault of the runtime); the scan is tried again",
    "input_changed": "the scan's file changed while it was read; it is tried again",
    "backend_failed": "the inference engine failed; the scan is tried again",
    "backend_not_installed": "the inference engine is not installed",
    "publish_failed": "a sink did not take a message; it waits in the journal and is offered again",
    "report_failed": "reports not written: building the SR, FHIR report or heat-map failed",
    "report_source_invalid": "reports not written: the scan's header lacks a valid Study, Series or SOP "
    "Instance UID a report must reference",
    "fhir_report_invalid": "reports not written: the FHIR report failed validation (a fault of the runtime)",
    "report_timeout": "reports not written: the report process took longer than its time limit",
    "report_process_crashed": "reports not written: the report process stopped unexpectedly "
    "(crashed or killed)",
    "disk_full": "reports not written: the file system of the reports folder is full; reports resume "
    "once space is free",
    "journal_failed": "the journal cannot be read or written",
    "journal_integrity": "the journal is missing, replaced or damaged",
    # Why the MQTT broker cannot be reached (sinks/mqtt.py): the status' reason and last_error,
    # the health file and the IoT Core health report carry these; the log has the details.
    MQTT_AUTH_FAILED: "the MQTT broker rejected our credentials: check Mqtt.Username and "
    "Mqtt.Password/PasswordFile",
    MQTT_CONNECTION_REFUSED: "the MQTT broker refused the connection",
    MQTT_TLS_VERIFY_FAILED: "TLS verification of the MQTT broker failed: check Mqtt.Host and Mqtt.Tls.CaFile",
    MQTT_TLS_HANDSHAKE_FAILED: "the TLS handshake with the MQTT broker failed: if the broker requires a "
    "client certificate, set Mqtt.Tls.CertFile and KeyFile",
    MQTT_CLIENT_ID_CONFLICT: "the MQTT broker closed several sessions in a row right after they opened: "
    "another client probably uses the same Mqtt.ClientId; give every box its own",
}


def _class_of(code: str) -> type[EdgeRuntimeError] | None:
    pending: list[type[EdgeRuntimeError]] = [EdgeRuntimeError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def code_in_line(line: object) -> str | None:
    """The code in a status line ``<subject>: <code>: <fixed text>`` (its last error), or None.

    For what leaves the box without the subject, which is a scan reference or a message id.
    """
    match = re.match(r"[^:]*: ([a-z0-9_]+): ", str(line or ""))
    return match.group(1) if match else None


def public_text(code: str) -> str:
    """The fixed text for ``code`` in messages that leave the process (see :data:`PUBLIC_TEXTS`).

    A code without its own text (a class added later) gets its nearest parent
    class's text, so no code is ever published with free text.
    """
    text = PUBLIC_TEXTS.get(code)
    cls = _class_of(code) if text is None else None
    while text is None and cls is not None and cls is not EdgeRuntimeError:
        cls = cls.__mro__[1]
        text = PUBLIC_TEXTS.get(getattr(cls, "code", ""))
    return text or PUBLIC_TEXTS[UNEXPECTED_ERROR]


def public_code(exc: BaseException) -> str:
    """The code published for ``exc``: its own when it is ours, else :data:`UNEXPECTED_ERROR`."""
    return exc.code if isinstance(exc, EdgeRuntimeError) else UNEXPECTED_ERROR
