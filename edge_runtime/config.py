"""The one typed configuration object, :class:`RuntimeConfig`.

Why one module over 500 lines: it is the one typed configuration (every section,
its validation and its description, which the recipe and ``config check`` show).

Keys are PascalCase in files, in the environment and (later) in the
Greengrass recipe's ``DefaultConfiguration``; Python code sees snake_case
attributes. The mapping is a single alias generator, so a recipe key and a
config attribute can never drift apart. Unknown keys are rejected, values
are validated at start-up, and the object is frozen: a configuration update
builds a new object instead of mutating the running one.

Sources, later ones win:

1. built-in defaults,
2. a YAML or JSON file (``edge-runtime run --config FILE``),
3. environment variables ``EDGE_RUNTIME__<SECTION>__<KEY>=value``
   (case-insensitive, double underscores separate levels, values parsed as
   YAML scalars), e.g. ``EDGE_RUNTIME__MQTT__PORT=8883``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_pascal
from pydantic_core import PydanticCustomError

from .errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AdminConfig",
    "AzureConfig",
    "DecodeConfig",
    "DicomConfig",
    "DicomNodeConfig",
    "DriftConfig",
    "GreengrassConfig",
    "HealthConfig",
    "InboxConfig",
    "IntakeConfig",
    "JournalConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "PrivacyConfig",
    "ReportsConfig",
    "RuntimeConfig",
    "TlsConfig",
    "load_config",
    "read_secret_file",
]

ENV_PREFIX = "EDGE_RUNTIME__"
#: Optional settings: an empty string (how a recipe or an environment variable says "unset") is None.
EMPTY_IS_NONE = BeforeValidator(lambda value: None if value in ("", None) else value)


def _publish_topic(value: str) -> str:
    if any(ch in value for ch in "#+"):
        raise ValueError("a publish topic must not contain '#' or '+'")
    return value


#: A topic we publish to (empty: off): MQTT wildcards there would be a mistake, refused at start-up.
PublishTopic = Annotated[str, AfterValidator(_publish_topic)]


def read_secret_file(path: Path, what: str, setting: str) -> str:
    """The first line of a secret file (a password, a token): kept out of configs and recipes.

    Raises:
        ConfigError: naming the file, why it cannot be read, and the setting to fix.
    """
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError) as exc:
        raise ConfigError(
            f"Cannot read the {what} from {path}: {getattr(exc, 'strerror', None) or 'the file is empty'}.",
            action=f"Fix {setting} (the file's first line is the {what}).",
        ) from exc


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_pascal,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


class InboxConfig(_Section):
    """Where scans arrive and where they go afterwards."""

    path: Path = Field(Path("inbox"), description="Folder watched for new scans.")
    quarantine_path: Path = Field(
        Path("quarantine"), description="Bad inputs are moved here with a NAME.error.json."
    )
    processed_path: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None,
        description="If set, finished scans are moved here; if empty they are deleted once "
        "their result is recorded in the journal.",
    )
    settle_seconds: float = Field(
        1.0, ge=0.0, le=3600.0, description="A file must keep its size and mtime this long."
    )
    rescan_interval_seconds: float = Field(
        5.0, gt=0.0, le=3600.0, description="Periodic full scan, in case a file event was missed."
    )
    use_inotify: bool = Field(True, description="Use filesystem events (watchdog) as well.")
    ignore_suffixes: tuple[str, ...] = Field(
        (".part", ".tmp", ".error.json", ".swp"),
        description="Files being written by senders (storescp writes NAME.part, then renames).",
    )
    symlinks: Literal["refuse", "inside-inbox"] = Field(
        "refuse",
        description="Symbolic links in the inbox: 'refuse' quarantines them unread; 'inside-inbox' "
        "follows a link only to a regular file inside the inbox.",
    )
    max_file_mb: int = Field(
        1024, ge=1, le=65536, description="Larger files are quarantined unread (a guard, like MaxPixels)."
    )
    read_timeout_seconds: float = Field(
        60.0, gt=0.0, le=3600.0, description="Reading (hashing) one file must finish within this."
    )


class DecodeConfig(_Section):
    """Limits applied before decoding."""

    max_pixels: int = Field(
        50_000_000, gt=0, description="Refuse images with more pixels (decompression bombs)."
    )
    isolate: bool = Field(
        True, description="Decode in a child process that can be stopped (see the next two)."
    )
    timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="A decode taking longer is stopped; file quarantined."
    )
    memory_limit_mb: int = Field(
        2048, ge=0, description="Address-space cap of the decoder process (0 = no cap)."
    )
    processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Decoder child processes shared by the workers (each holds a full-resolution "
        "image while it decodes); 0 = one per worker.",
    )


class IntakeConfig(_Section):
    """Which scans the model is allowed to see (from the bundle's intended use)."""

    enforce_intended_use: bool = Field(
        True,
        description="Quarantine DICOM scans whose modality / body part / view the "
        "model bundle does not declare as intended use.",
    )
    require_tags: bool = Field(
        False, description="Also quarantine DICOM scans that lack those header fields."
    )
    out_of_scope: Literal["report", "quarantine"] = Field(
        "report",
        description="A scan the model reads but finds outside its intended use (a patient age "
        "outside the bundle's range, or an image unlike its training images): report (a result "
        "with no decision, intended_use.within false and the reasons, never urgent; the "
        "hospital learns it was seen and why it was not assessed) or quarantine (no result; "
        "the file and its reasons go to the quarantine folder).",
    )


class ModelConfig(_Section):
    """Which model bundle to run, and on what."""

    bundle_path: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="Model bundle folder; empty means the bundled default model."
    )
    backend: str = Field(
        "onnxruntime",
        description="Inference engine: a name registered in edge_runtime.backends (onnxruntime, "
        "litert), or auto: the fastest engine of the bundle on this box that passes its "
        "conformance check (timed at start-up; the choice is logged).",
    )
    threads: int = Field(1, ge=1, le=64, description="Intra-op threads per inference session.")
    threshold: Annotated[float | None, EMPTY_IS_NONE] = Field(
        None, ge=0.0, le=1.0, description="Override the bundle's operating point (rarely wise)."
    )
    trusted_keys: tuple[str, ...] = Field(
        default_factory=lambda: (str(_bundled_models_key()),),
        description="Public keys (ECDSA P-256) whose signature on a bundle's manifest.json is "
        "believed: each a PEM file path or the PEM text itself. Default: the key of the models "
        "shipped in the package. Production: list only your release pipeline's key.",
    )
    require_signature: bool = Field(
        True,
        description="Refuse bundles not signed by a trusted key. false is for development "
        "only: such bundles then load with a warning and status says 'not verified'.",
    )

    @field_validator("trusted_keys")
    @classmethod
    def _loadable_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Checked at start-up, so a typo in a key path is a config error, not a refused model later.
        from .keyfiles import load_public_key

        for entry in value:
            load_public_key(entry)  # ValueError names the entry
        return value

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, value: str) -> str:
        # Checked against the registry, not a fixed list, so a registered plugin can be chosen.
        from .backend_registry import AUTO_BACKEND, available_backends

        if value != AUTO_BACKEND and value not in available_backends():
            choices = ", ".join([*available_backends(), AUTO_BACKEND])
            raise ValueError(f"unknown backend {value!r}; available: {choices}")
        return value


def _bundled_models_key() -> Path:
    from .keyfiles import bundled_models_key_path

    return bundled_models_key_path()


class TlsConfig(_Section):
    """TLS to the broker: server verification, optionally a client certificate (mutual TLS)."""

    enabled: bool = False
    ca_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="CA bundle that signed the broker's certificate."
    )
    cert_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="Client certificate (PEM) for mutual TLS."
    )
    key_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="Private key (PEM) of the client certificate."
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("CertFile and KeyFile must be set together (mutual TLS)")
        return self


class MqttConfig(_Section):
    """Where results are published."""

    enabled: bool = Field(
        True,
        description="Publish to this broker (under Greengrass, results "
        "can go over local pub/sub and the MQTT bridge instead).",
    )
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field(
        default_factory=lambda: f"edge-runtime-{socket.gethostname()}",
        min_length=1,
        max_length=128,
    )
    topic_prefix: str = Field("healthdiag/edge", min_length=1)
    qos: Literal[0, 1, 2] = 1
    keepalive_seconds: int = Field(30, ge=5, le=3600)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    username: Annotated[str | None, EMPTY_IS_NONE] = None
    password: Annotated[str | None, EMPTY_IS_NONE] = Field(
        None, description="Prefer PasswordFile: keeps it out of configs."
    )
    password_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="File whose first line is the password."
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @model_validator(mode="after")
    def _one_password(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set Password or PasswordFile, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a Username")
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _no_wildcards(cls, value: str) -> str:
        if any(ch in value for ch in "#+") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must not contain '#' or '+' or start/end with '/'")
        return value

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}/results"

    @property
    def status_topic(self) -> str:
        return f"{self.topic_prefix}/status"

    @property
    def drift_topic(self) -> str:
        return f"{self.topic_prefix}/drift"


class JournalConfig(_Section):
    """The SQLite journal that makes processing restartable."""

    path: Path = Path("state/journal.sqlite3")
    max_attempts: int = Field(3, ge=1, le=100, description="Give up on a scan after this many.")
    min_free_disk_mb: int = Field(
        500,
        ge=0,
        description="Below this much free space (journal or inbox disk) new scans "
        "stay in the inbox until space is freed.",
    )
    max_outbox_messages: int = Field(
        100_000,
        ge=1,
        description="Undelivered results of the results channel (MQTT results and urgent topics; "
        "Greengrass local pub/sub when MQTT is off) kept at most; beyond it new scans wait in the "
        "inbox (never dropped) until the broker takes some. No other sink's backlog holds new scans.",
    )
    max_outbox_messages_per_sink: int = Field(
        10_000,
        ge=1,
        description="Undelivered rows kept at most for each other sink (PACS, FHIR server, MQTT FHIR "
        "topic, Greengrass); beyond it that sink's oldest undelivered rows are dropped (a WARNING "
        "naming the sink, the status counter outbox_dropped), never holding new scans.",
    )


class GreengrassConfig(_Section):
    """Extra result sinks through the Greengrass nucleus (used only when it started us)."""

    local_topic: PublishTopic = Field(
        "healthdiag/edge/results",
        description="Greengrass local pub/sub topic for results (PublishToTopic); empty = off.",
    )
    local_priority_topic: PublishTopic = Field(
        "healthdiag/edge/results/urgent",
        description="Greengrass local pub/sub topic on which urgent results are published again "
        "(as on the MQTT priority topic); empty = off.",
    )
    local_fhir_topic: PublishTopic = Field(
        "healthdiag/edge/fhir",
        description="Greengrass local pub/sub topic for each result's FHIR report (the transaction "
        "Bundle, as on the MQTT FHIR topic; Reports.Fhir false stops it too); empty = off.",
    )
    iot_core_topic: PublishTopic = Field(
        "",
        description="AWS IoT Core topic for de-identified results (PublishToIoTCore, QoS 1); "
        "empty = off. Identifiers of the scan never leave the box.",
    )
    iot_core_priority_topic: PublishTopic = Field(
        "",
        description="AWS IoT Core topic on which urgent results are published again, de-identified "
        "like IotCoreTopic's; empty = off. FHIR reports never go to IoT Core: they reference the "
        "study by its Study Instance UID.",
    )
    status_topic: PublishTopic = Field(
        "healthdiag/edge/status",
        description="AWS IoT Core topic prefix for this box's health report: every heartbeat the "
        "status (model version, its conformance check, counters; no scan identifiers) is published "
        "retained to <prefix>/<thing name>, where the release pipeline's canary check reads it; "
        "empty = off.",
    )
    status_every_seconds: float = Field(
        600.0,
        ge=0.0,
        le=86400.0,
        description="The AWS IoT Core health report is sent when what it says changes (state, reason, "
        "model and its conformance check, quarantined scans) and at least this often; 0 = every "
        "heartbeat. At 10 000 boxes a report every 30 s is ~29 M messages a day, every 10 min ~1.4 M.",
    )


def _output_name(value: str) -> str:
    """An edgeHub output name, as routes name it (``FROM /messages/modules/<m>/outputs/<name>``)."""
    if value and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(
            f"{value!r} is not an edgeHub output name: use letters, digits, '-' and '_' (at most 64), "
            "the name the deployment manifest's routes use"
        )
    return value


#: An edgeHub output we send to (empty: off).
OutputName = Annotated[str, AfterValidator(_output_name)]


class AzureConfig(_Section):
    """Result outputs and reporting through Azure IoT Edge's edgeHub (used only when IoT Edge started us)."""

    results_output: OutputName = Field(
        "results",
        description="edgeHub output for every result, de-identified as for AWS IoT Core (the "
        "deployment manifest routes it to IoT Hub, $upstream); empty = off. With Mqtt.Enabled false it "
        "is the results channel, whose backlog holds new scans.",
    )
    urgent_output: OutputName = Field(
        "urgent",
        description="edgeHub output on which urgent results are sent again, de-identified; empty = off.",
    )
    fhir_output: OutputName = Field(
        "",
        description="edgeHub output for each result's FHIR report (the transaction Bundle), e.g. "
        "'fhir'; empty = off (the default). The Bundle names the study by its Study Instance UID: "
        "route this output only to a module on this box, never to $upstream (the generated "
        "manifest sets it only with --local-consumer and refuses such a route). Off by default "
        "because routes live outside this process: a twin written by hand with a catch-all route "
        "would otherwise send it to IoT Hub.",
    )

    @model_validator(mode="after")
    def _distinct_outputs(self) -> AzureConfig:
        outputs = [o for o in (self.results_output, self.urgent_output, self.fhir_output) if o]
        if len(outputs) != len(set(outputs)):
            raise ValueError(
                "ResultsOutput, UrgentOutput and FhirOutput must be different outputs (or empty): "
                "routes tell outputs apart by name, so a shared one would send FHIR reports, which name "
                "the study, wherever the de-identified results go"
            )
        return self

    status_every_seconds: float = Field(
        600.0,
        ge=0.0,
        le=86400.0,
        description="The module twin's reported properties (runtime, model, conformance, health) are "
        "updated when what they say changes and at least this often; 0 = every heartbeat.",
    )


class DriftConfig(_Section):
    """Per-site drift monitoring: are recent scans still like the model's validation images?"""

    enabled: bool = Field(
        True,
        description="Compare this site's recent scans (share outside the intended use, OOD scores, "
        "P(positive), header fields) with the model bundle's validation reference; the verdict is in "
        "the status, the health file, 'edge-runtime health' and on <Mqtt.TopicPrefix>/drift.",
    )
    window_scans: int = Field(200, ge=10, le=5000, description="The scans window: the last this many.")
    window_hours: float = Field(
        24.0, gt=0.0, le=720.0, description="The time window: the last this many hours."
    )
    min_scans: int = Field(
        50, ge=10, le=5000, description="A window with fewer scans says 'warming-up' and never alarms."
    )
    psi_alarm: float = Field(
        0.25,
        gt=0.0,
        le=10.0,
        description="Population stability index of a distribution that raises the alarm (0.1: watch).",
    )
    outside_share_alarm: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Share of the window outside the intended use that raises the alarm (0.1: watch).",
    )
    iot_core_topic: PublishTopic = Field(
        "healthdiag/edge/drift",
        description="Under Greengrass: the drift report is published retained to <this>/<thing name> in "
        "AWS IoT Core when its state changes (and with the health report); empty = off.",
    )


class HealthConfig(_Section):
    """Heartbeat on the status topic and a local health file for ops and Greengrass."""

    heartbeat_seconds: float = Field(30.0, ge=1.0, le=3600.0)
    watchdog_seconds: float = Field(
        0.0,
        ge=0.0,
        le=86400.0,
        description="A worker on one scan longer than this makes the service 'degraded' (and "
        "'edge-runtime health' fail); 0 = automatic: Inbox.ReadTimeoutSeconds + 3 x "
        "Decode.TimeoutSeconds, at least 120 s.",
    )
    file: Path = Field(
        Path("state/health.json"), description="Rewritten every heartbeat; read by 'edge-runtime health'."
    )


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


#: Where the admin page needs no token: this machine's own loopback address, nothing else. Other
#: 127.x addresses count as elsewhere: a container runtime or a port forward may publish them.
ADMIN_LOCAL_ADDRESSES = ("127.0.0.1", "::1", "localhost")


class AdminConfig(_Section):
    """The admin page and the monitoring endpoints (/health/live, /health/ready, /api/status, /metrics)."""

    enabled: bool = Field(True, description="Serve the admin page and the monitoring endpoints.")
    bind: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the page listens on. 127.0.0.1 (the default) or ::1 is reachable only from "
        "this box; any other address needs Admin.TokenFile, and every page but /health/live then asks "
        "for it.",
    )
    port: int = Field(8380, ge=0, le=65535, description="Port of the page; 0 = any free port (logged).")
    token_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None,
        description="File whose first line is the admin token (at least 16 characters): asked for on "
        "every page and endpoint but /health/live (browsers sign in once; scrapers send "
        "'Authorization: Bearer <token>'). Required when Admin.Bind is not loopback.",
    )
    read_only: bool = Field(
        False, description="Show everything, change nothing: no quarantine retry or discard from the page."
    )
    recent_scans: int = Field(50, ge=1, le=1000, description="Scans listed on the Recent scans page.")
    show_images: bool = Field(
        True,
        description="Show each scan's heat map (the image itself, overlaid) on the page. Text burned into "
        "an image (names on some CR/DX films and screen exports) shows with it: set false where that "
        "is a concern.",
    )
    log_lines: int = Field(300, ge=10, le=10000, description="Log lines the Logs page keeps (in memory).")

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        if self.enabled and self.bind.lower() not in ADMIN_LOCAL_ADDRESSES and self.token_file is None:
            raise ValueError(
                f"Admin.Bind is {self.bind}, which other machines can reach, but Admin.TokenFile is "
                "not set: set Admin.TokenFile to a file holding a token of at least 16 characters, or "
                "bind the page to 127.0.0.1 (and reach it through an SSH tunnel)"
            )
        return self


class PrivacyConfig(_Section):
    """What may name a scan outside the process (file names carry patient names)."""

    publish_file_names: bool = Field(
        False,
        description="Results on the hospital broker carry the original file name instead of the "
        "scan reference (for sites that want names on their LAN; never sent to AWS IoT Core).",
    )
    log_file_names: bool = Field(
        False, description="Logs name files; by default they carry scan references (logs may leave the box)."
    )
    reference_key_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None,
        description="Key of the scan references (created on first start); empty = reference.key "
        "beside the journal.",
    )


_AE_TITLE = r"^[ -\[\]-~]{1,16}$"  # printable ASCII without backslash, 1-16 characters


class DicomNodeConfig(_Section):
    """A DICOM node results are sent to by C-STORE (e.g. the PACS); an empty Host = off."""

    host: str = Field("", description="PACS host name or address; empty = do not send.")
    port: int = Field(104, ge=1, le=65535)
    ae_title: str = Field("PACS", pattern=_AE_TITLE, description="The PACS's AE title (called AE).")
    timeout_seconds: float = Field(30.0, gt=0, le=3600, description="Association and DIMSE timeout.")


class DicomConfig(_Section):
    """The DICOM network receiver (C-STORE SCP) and the PACS node that gets our reports."""

    enabled: bool = Field(False, description="Receive scans by DICOM C-STORE (C-ECHO answered too).")
    ae_title: str = Field("HEALTHDIAG", pattern=_AE_TITLE, description="Our AE title (called AE).")
    # Modalities connect over the hospital network; the allow-lists below narrow who may send.
    bind_address: str = Field(
        "0.0.0.0",  # noqa: S104
        min_length=1,
        description="Address the receiver listens on.",
    )
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_ae_titles: tuple[str, ...] = Field(
        (), description="Calling AE titles allowed to send; empty = any (then restrict AllowedAddresses)."
    )
    allowed_addresses: tuple[str, ...] = Field(
        (), description="Peer addresses or networks (CIDR) allowed to connect; empty = any."
    )
    max_associations: int = Field(4, ge=1, le=64, description="Concurrent associations accepted.")
    max_associations_per_peer: int = Field(
        0,
        ge=0,
        le=64,
        description="Concurrent connections from one address; one more is closed at connect. "
        "0 = half of MaxAssociations (at least 1), so one host cannot take every slot.",
    )
    max_object_mb: int = Field(
        1024,
        ge=1,
        le=65536,
        description="A larger object is refused (C-STORE failure status); what arrives past the "
        "limit is not kept in memory, and past twice the limit the association is aborted.",
    )
    read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A connection must send its association request, and each PDU once begun, "
        "within this time (and take each of our replies within it), or it is closed.",
    )
    idle_timeout_seconds: float = Field(
        60.0, gt=0, le=86400, description="An association with no traffic this long is aborted."
    )
    spool_path: Path = Field(
        Path("state/dicom-spool"),
        description="Received objects are written here (fsynced) before success is returned.",
    )
    store: DicomNodeConfig = Field(default_factory=DicomNodeConfig)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _ae_titles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for title in value:
            if not re.match(_AE_TITLE, title):
                raise ValueError(f"{title!r} is not an AE title (1-16 printable characters, no backslash)")
        return value

    @model_validator(mode="after")
    def _per_peer_within_total(self) -> DicomConfig:
        if self.max_associations_per_peer > self.max_associations:
            raise ValueError(
                f"MaxAssociationsPerPeer ({self.max_associations_per_peer}) is over MaxAssociations "
                f"({self.max_associations}); lower it, or 0 for half of MaxAssociations"
            )
        return self

    @property
    def associations_per_peer(self) -> int:
        """``MaxAssociationsPerPeer``, with 0 resolved to half of ``MaxAssociations`` (at least 1)."""
        return self.max_associations_per_peer or max(1, self.max_associations // 2)

    @field_validator("allowed_addresses")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Parsed as the receiver parses them (a bare address is a /32 or /128), so a typo such as
        # 10.0.0.0/33 is a configuration error at 'config check', not a refused start later.
        bad = []
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                bad.append(entry)
        if bad:
            listed = ", ".join(repr(entry) for entry in bad)
            what = "is not an IP address or network" if len(bad) == 1 else "are not IP addresses or networks"
            raise ValueError(
                f"{listed} {what}"
                " (use addresses like 10.1.2.3 or CIDR networks like 10.1.2.0/24; the prefix length is at "
                "most /32 for IPv4, /128 for IPv6)"
            )
        return value


class ReportsConfig(_Section):
    """Reports beside the MQTT result: DICOM SR, FHIR, heat-map; urgent findings first."""

    path: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None,
        description="Folder for the per-result files (SR, heat-map PNG and Secondary Capture, FHIR); "
        "empty = reports/ beside the journal.",
    )
    dicom_sr: bool = Field(True, description="Write a DICOM SR (TID 1500) for each DICOM scan.")
    fhir: bool = Field(True, description="Write a FHIR DiagnosticReport for each DICOM scan.")
    heatmap: bool = Field(
        True, description="Write the class-activation heat-map (PNG and DICOM Secondary Capture)."
    )
    child_idle_seconds: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="Let the report child exit after this long without a DICOM report and start it "
        "when the next is due (about 150 MB less between bursts; that report then waits about a "
        "second); 0 = it runs all the time.",
    )
    heatmap_max_side: int = Field(
        512,
        ge=64,
        le=4096,
        description="Longer side of the heat-map images in pixels (the map itself is the model's coarse "
        "grid; the full-resolution scan is in the PACS).",
    )
    keep_days: float = Field(
        30.0,
        ge=0.0,
        description="Remove a result's report folder this many days after it was written, once every "
        "sink has it; 0 = keep for ever.",
    )
    retain_mb_per_sink: int = Field(
        5_000,
        ge=0,
        description="Disk budget for the report folders one sink other than the results channel "
        "(e.g. the PACS) has not confirmed yet; beyond it that sink's oldest undelivered results "
        "are dropped for it (a WARNING naming the sink) and their folders removed unless another "
        "sink still needs them; 0 = no budget (kept until delivered).",
    )
    uid_root: str = Field(
        "2.25",
        pattern=r"^[0-9]+(\.[0-9]+)*$",
        max_length=40,
        description="Root of the UIDs of the objects we create ('2.25' = UUID-derived UIDs).",
    )
    fhir_topic: PublishTopic = Field(
        "", description="MQTT topic for FHIR reports; empty = <TopicPrefix>/fhir (set Fhir false to stop)."
    )
    fhir_endpoint: str = Field(
        "", description="FHIR server base URL the reports are sent to (transaction Bundle); empty = off."
    )
    fhir_token_file: Annotated[Path | None, EMPTY_IS_NONE] = Field(
        None, description="File whose first line is a bearer token for the FHIR server."
    )
    urgent_threshold: Annotated[float | None, EMPTY_IS_NONE] = Field(
        None,
        ge=0.0,
        le=1.0,
        description="A positive finding with P >= this is urgent: also published on the priority "
        "topic and flagged in SR/FHIR; empty = the model's operating threshold.",
    )
    priority_topic: PublishTopic = Field(
        "", description="MQTT topic for urgent results; empty = <TopicPrefix>/results/urgent."
    )

    @field_validator("fhir_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError("must be the FHIR server's base URL, https://... (or http:// on a test LAN)")
        return value


class RuntimeConfig(_Section):
    """Everything the edge runtime can be told. Built once at start-up."""

    inbox: InboxConfig = Field(default_factory=InboxConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    greengrass: GreengrassConfig = Field(default_factory=GreengrassConfig)
    azure: AzureConfig = Field(default_factory=AzureConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    workers: int = Field(0, ge=0, le=64, description="Scan workers; 0 = one per CPU core.")

    @model_validator(mode="after")
    def _spool_outside_inbox(self) -> RuntimeConfig:
        problem = _spool_overlap(self.dicom.enabled, self.inbox.path, self.dicom.spool_path)
        if problem:
            raise PydanticCustomError("spool_in_inbox", problem)
        return self

    @property
    def reference_key_path(self) -> Path:
        """Where the scan-reference key lives (beside the journal unless configured)."""
        return self.privacy.reference_key_file or self.journal.path.parent / "reference.key"

    @property
    def drift_state_path(self) -> Path:
        """The drift monitor's saved windows (beside the journal)."""
        return self.journal.path.parent / "drift-state.json"

    @property
    def reports_path(self) -> Path:
        """Where each result's report files go (beside the journal unless configured)."""
        return self.reports.path or self.journal.path.parent / "reports"

    @property
    def effective_workers(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    def to_pascal_dict(self) -> dict[str, Any]:
        """The configuration as the file / recipe would spell it."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "configuration") -> RuntimeConfig:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            # Checks across sections run only once every section is valid; say them now too, so
            # one 'config check' lists every problem.
            errors = exc.errors()
            extra = [] if any(not e["loc"] for e in errors) else _cross_section_problems(data)
            raise ConfigError(_explain(exc, source, extra)) from None


def _spool_overlap(enabled: bool, inbox: Path, spool: Path) -> str | None:
    """Why ``Dicom.SpoolPath`` cannot be used with ``Inbox.Path`` (compared as ``run`` does), or None."""
    if not enabled:
        return None
    inbox, spool = inbox.absolute(), spool.absolute()
    if not (spool.is_relative_to(inbox) or inbox.is_relative_to(spool)):
        return None
    if spool == inbox:
        how = "is the inbox"
    else:
        how = "is inside Inbox.Path" if spool.is_relative_to(inbox) else "contains Inbox.Path"
    return (
        f"Dicom.SpoolPath {spool} {how} ({inbox}): each received object would be taken by both "
        "sources. Give Dicom.SpoolPath a folder of its own, outside the inbox "
        "(default state/dicom-spool)"
    )


def _raw(data: Mapping[str, Any], section: str, key: str) -> Any:
    """A raw setting as the file/environment spelt it (keys matched as the models match them)."""

    def find(node: Any, name: str) -> Any:
        if not isinstance(node, Mapping):
            return None
        flat = name.replace("_", "").lower()
        return next((v for k, v in node.items() if str(k).replace("_", "").lower() == flat), None)

    return find(find(data, section), key)


def _cross_section_problems(data: Mapping[str, Any]) -> list[str]:
    """The checks across sections, from the raw settings, for a configuration with other errors."""
    try:
        enabled = TypeAdapter(bool).validate_python(_raw(data, "Dicom", "Enabled") or False)
        inbox = TypeAdapter(Path).validate_python(
            _raw(data, "Inbox", "Path") or InboxConfig.model_fields["path"].default
        )
        spool = TypeAdapter(Path).validate_python(
            _raw(data, "Dicom", "SpoolPath") or DicomConfig.model_fields["spool_path"].default
        )
    except ValidationError:
        return []  # those settings are invalid themselves (and listed as such)
    problem = _spool_overlap(enabled, inbox, spool)
    return [problem] if problem else []


def _explain(exc: ValidationError, source: str, extra: list[str] | None = None) -> str:
    lines = [f"Invalid {source}:"]
    for err in exc.errors():
        if not err["loc"]:  # a check across sections: its message names the settings
            lines.append(f"  - {err['msg']}")
            continue
        where = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown setting (check spelling; keys are PascalCase)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {where}: {err['msg']}{shown}")
    lines += [f"  - {problem}" for problem in extra or ()]
    return "\n".join(lines)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"Cannot read configuration file {path}: it does not exist"
            + ("." if path.is_absolute() else f" (looked for {path.absolute()})."),
            action="Check the file name and folder (a relative path is taken from the current "
            f"folder), or create the file; without --config the built-in defaults and {ENV_PREFIX}... "
            "environment settings apply.",
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"Cannot read configuration file {path}: it is a folder, not a file.",
            action="Pass the configuration file itself, e.g. --config edge.yaml.",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"Cannot read configuration file {path}: {exc.strerror}.",
            action=f"Make sure the user running edge-runtime can read {path}, then try again.",
        ) from exc
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Configuration file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Configuration file {path} must contain a mapping of settings.")
    return data


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``value`` at a case-insensitive key path, creating sections as needed."""
    node = target
    for i, key in enumerate(keys):
        # Keep an existing key's spelling when the env var differs only in case.
        flat = key.replace("_", "").lower()
        match = next((k for k in node if k.replace("_", "").lower() == flat), None)
        name = match or to_pascal(key.lower())
        if i == len(keys) - 1:
            node[name] = value
        else:
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node = child


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    overrides = []
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        keys = [k for k in name[len(ENV_PREFIX) :].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        overrides.append((keys, value, name))
    return overrides


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Build the effective configuration from defaults, a file and the environment.

    Raises:
        ConfigError: listing every invalid or unknown setting, with its source.
    """
    data: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    overrides = _env_overrides(os.environ if environ is None else environ)
    for keys, value, _ in overrides:
        _set_path(data, keys, value)
    sources = [str(path)] if path is not None else []
    sources += [name for _, _, name in overrides]
    source = "configuration (" + ", ".join(sources) + ")" if sources else "configuration"
    return RuntimeConfig.from_mapping(data, source=source)
