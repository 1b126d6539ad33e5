"""Azure IoT Edge integration: the runtime as a module, managed through edgeHub.

Used only when the IoT Edge runtime started us (edgeAgent sets the
``IOTEDGE_*`` variables :data:`EDGE_ENVIRONMENT` names). One connection to
edgeHub, made by the unmodified ``azure-iot-device`` client, carries:

* the configuration: the module twin's **desired properties**, with exactly the
  keys of the Greengrass component's configuration (nested PascalCase, the same
  validation). A desired-property patch is merged into the twin we hold and then
  goes through the same path as a Greengrass configuration update: applied live
  with an atomic swap, or refused while the running configuration stays;
* what the module runs and how it is doing, in its **reported properties**
  (runtime and model version, conformance verdict, health, drift) and what
  became of the latest desired version (``configuration``);
* **direct methods**, answered by :class:`~edge_runtime.remote_methods.RemoteMethods`;
* the results, sent to edgeHub **outputs** by :mod:`edge_runtime.sinks.edgehub`.

The client signs its SAS token through the IoT Edge workload API and renews it
before it expires (120 s ahead); ``EDGE_RUNTIME_SAS_TOKEN_TTL_SECONDS`` sets its
lifetime (default 3600, the SDK's) and ``EDGE_RUNTIME_EDGEHUB_RETRY_SECONDS`` how
long it waits between reconnection attempts (default 10). Both are read before the
twin can be, which is why they are environment variables and not settings.

azure-iot-device is imported lazily: boxes under Greengrass do not need it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import __version__
from .config import RuntimeConfig
from .errors import ConfigError, EdgeRuntimeError, PublishError, code_in_line
from .hosts import ConfigOutcome, MethodCall

__all__ = [
    "EDGE_ENVIRONMENT",
    "EdgeHubModule",
    "merge_patch",
    "resolve_device_id",
    "running_under_iot_edge",
    "twin_safe",
]

log = logging.getLogger(__name__)

#: What edgeAgent sets for every module it starts (create_from_edge_environment reads them all).
EDGE_ENVIRONMENT = (
    "IOTEDGE_IOTHUBHOSTNAME",
    "IOTEDGE_DEVICEID",
    "IOTEDGE_MODULEID",
    "IOTEDGE_GATEWAYHOSTNAME",
    "IOTEDGE_MODULEGENERATIONID",
    "IOTEDGE_WORKLOADURI",
    "IOTEDGE_APIVERSION",
)
SAS_TTL_ENV = "EDGE_RUNTIME_SAS_TOKEN_TTL_SECONDS"
RETRY_ENV = "EDGE_RUNTIME_EDGEHUB_RETRY_SECONDS"
#: In desired properties (Mqtt.ClientId): replaced by this box's IoT Edge device id.
DEVICE_PLACEHOLDER = "{deviceId}"
#: Characters a twin property name may not contain.
_TWIN_KEY_FORBIDDEN = (".", "$", " ")
#: How long to wait for edgeHub at start before giving up (edgeAgent restarts the module).
CONNECT_TIMEOUT_S = 60.0


def running_under_iot_edge(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(env.get(name) for name in EDGE_ENVIRONMENT)


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a twin patch to ``target`` in place (JSON merge patch: null deletes; ``$`` keys skipped)."""
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        elif isinstance(value, Mapping):
            target[key] = merge_patch({}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def resolve_device_id(desired: dict[str, Any], device_id: str) -> dict[str, Any]:
    """``{deviceId}`` in ``Mqtt.ClientId`` -> this box's device id (a copy; the twin stays as written)."""
    data = copy.deepcopy(desired)
    mqtt = data.get("Mqtt")
    if isinstance(mqtt, dict) and DEVICE_PLACEHOLDER in str(mqtt.get("ClientId", "")):
        mqtt["ClientId"] = str(mqtt["ClientId"]).replace(DEVICE_PLACEHOLDER, device_id)
    return data


def twin_safe(value: Any) -> Any:
    """``value`` as a twin accepts it: no '.', '$' or space in property names, lists for tuples."""
    if isinstance(value, Mapping):
        safe = {}
        for key, item in value.items():
            name = str(key)
            for char in _TWIN_KEY_FORBIDDEN:
                name = name.replace(char, "_")
            safe[name] = twin_safe(item)
        return safe
    if isinstance(value, (list, tuple)):
        return [twin_safe(item) for item in value]
    return value


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _client_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """The client's options that come from the environment (see the module docstring)."""
    options: dict[str, Any] = {}
    for name, option in ((SAS_TTL_ENV, "sastoken_ttl"), (RETRY_ENV, "connection_retry_interval")):
        raw = environ.get(name)
        if not raw:
            continue
        try:
            options[option] = int(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{name}={raw!r} is not a whole number of seconds.",
                action=f"Set {name} in the module's env (deployment manifest) to an integer, or remove it.",
            ) from exc
    return options


class EdgeHubModule:
    """This module's connection to edgeHub: twin, direct methods and outputs (a :class:`~.hosts.Host`)."""

    name = "Azure IoT Edge"

    def __init__(self, client: Any = None, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        # The SDK logs every publish and twin request at INFO: one line per result and per heartbeat
        # would bury what happened to each scan. Its warnings and errors still show.
        logging.getLogger("azure.iot.device").setLevel(logging.WARNING)
        if client is None:
            client = _create_client(env)
        self.client = client
        self.device_id = env.get("IOTEDGE_DEVICEID", "")
        self.module_id = env.get("IOTEDGE_MODULEID", "")
        self._lock = threading.Lock()
        #: The desired properties as we hold them (without $version), and their version.
        self._desired: dict[str, Any] = {}
        self._desired_version: int | None = None
        #: The desired version the last successful load_config read (what an outcome refers to).
        self._loaded_version: int | None = None
        #: Azure.StatusEverySeconds of the configuration last loaded.
        self._status_every_s = 600.0
        #: What the last status report said (its meaningful part) and when it was sent.
        self._status_sent: tuple[str, float] | None = None
        self._connection_listeners: list[Callable[[], None]] = []
        #: When the connection to edgeHub was lost (None: connected, or never connected yet).
        self._down_since: float | None = None
        self._gateway = env.get("IOTEDGE_GATEWAYHOSTNAME", "?")
        self._closing = threading.Event()
        #: Set by the SDK's patch handler: the twin changed, read it again (on the twin thread).
        self._twin_changed = threading.Event()
        self._twin_thread: threading.Thread | None = None
        #: Reported properties waiting for the reporter thread (top-level keys; the latest wins).
        self._reports: dict[str, Any] = {}
        self._reports_ready = threading.Event()
        self._reporting = False
        # Twin requests block while edgeHub is away (the SDK waits for the reconnect): they are
        # made on a thread of their own, never on the heartbeat or under the configuration lock.
        self._reporter = threading.Thread(target=self._report_loop, name="twin-reported", daemon=True)
        self._reporter.start()
        self.client.on_connection_state_change = self._connection_changed

    # -- connection --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and read the twin; retried until ``timeout_s`` (edgeHub may start after us)."""
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while True:
            try:
                self.client.connect()
                self.read_twin()
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise EdgeRuntimeError(
                        f"Could not reach edgeHub at {self._gateway}:8883 "
                        f"within {timeout_s:.0f} s ({type(exc).__name__}: {exc}).",
                        action="Check 'iotedge list' (edgeHub must be running) and 'iotedge check'; "
                        "edgeAgent restarts this module, and results made before the stop are kept.",
                    ) from exc
                log.warning("edgeHub not reachable yet (%s); retrying in %.0f s", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def problem(self) -> str | None:
        if self.connected:
            return None
        since = self._down_since
        when = "" if since is None else f" since {time.strftime('%H:%M:%S', time.gmtime(since))} UTC"
        return f"edgeHub not reachable{when}"

    def add_connection_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever the connection to edgeHub comes up or goes down."""
        self._connection_listeners.append(listener)

    def _connection_changed(self) -> None:
        up = self.connected
        self._down_since = None if up else (self._down_since or time.time())
        log.log(logging.INFO if up else logging.WARNING, "edgeHub connection %s", "up" if up else "down")
        for listener in list(self._connection_listeners):
            try:
                listener()
            except Exception:
                log.exception("edgeHub connection listener failed")

    # -- configuration (desired properties) ---------------------------------------------
    def read_twin(self) -> None:
        twin = self.client.get_twin()
        desired = dict(twin.get("desired") or {})
        version = desired.get("$version")
        with self._lock:
            self._desired = merge_patch({}, desired)
            self._desired_version = version if isinstance(version, int) else None
        log.info("module twin read: desired properties version %s", version)

    def load_config(self) -> RuntimeConfig:
        with self._lock:
            desired = copy.deepcopy(self._desired)
            version = self._desired_version
        config = RuntimeConfig.from_mapping(
            resolve_device_id(desired, self.device_id),
            source=f"module twin desired properties (version {version})",
        )
        with self._lock:
            self._loaded_version = version
            self._status_every_s = config.azure.status_every_seconds
        return config

    def subscribe_to_config_updates(self, on_update: Callable[[], None]) -> None:
        """Re-read the whole twin after every desired-property patch, on one thread, then ``on_update()``.

        The SDK calls its handlers on a pool of threads, so two patches close together
        could be merged and applied out of order; and after a reconnect it hands over the
        whole desired document as if it were a patch, which merging cannot tell from one
        (a key deleted meanwhile would stay). Reading the twin whole, in order, on one
        thread, is right in every case; patches are rare, so the extra request is cheap.
        One read right after subscribing catches a patch made since the first read.
        """

        def on_patch(patch: dict[str, Any]) -> None:
            log.info("module twin desired properties patch, version %s", patch.get("$version"))
            self._twin_changed.set()

        self.client.on_twin_desired_properties_patch_received = on_patch
        self._twin_thread = threading.Thread(
            target=self._twin_loop, args=(on_update,), name="twin-desired", daemon=True
        )
        self._twin_thread.start()
        self._twin_changed.set()

    def _twin_loop(self, on_update: Callable[[], None]) -> None:
        backoff = 1.0
        while not self._closing.is_set():
            self._twin_changed.wait()
            if self._closing.is_set():
                return
            self._twin_changed.clear()
            before = self._desired_version
            try:
                self.read_twin()
            except Exception as exc:
                log.warning("could not read the module twin (%s); trying again in %.0f s", exc, backoff)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self._twin_changed.set()
                continue
            backoff = 1.0
            if self._desired_version != before:
                try:
                    on_update()
                except Exception:
                    log.exception("applying desired properties version %s failed", self._desired_version)

    def config_outcome(self, outcome: ConfigOutcome) -> None:
        with self._lock:
            version = self._loaded_version if outcome.applied else self._desired_version
        status = "waiting" if outcome.waiting else "rejected"
        if outcome.applied:
            status = "applied; restart needed for some settings" if outcome.needs_restart else "applied"
        self._patch_reported(
            {
                "configuration": {
                    "desiredVersion": version,
                    "status": status,
                    "changed": ", ".join(outcome.changed),
                    "needsRestart": ", ".join(outcome.needs_restart),
                    # The check's explanation names settings and the values the operator wrote in
                    # the desired properties, which IoT Hub holds already: nothing from a scan.
                    "error": outcome.error[:4000],
                    "waiting": outcome.waiting,
                    "at": _utc_now(),
                }
            }
        )

    # -- direct methods ----------------------------------------------------------------
    def serve_methods(self, call: MethodCall) -> None:
        from azure.iot.device import MethodResponse

        def on_request(request: Any) -> None:
            started = time.perf_counter()
            try:
                status, payload = call(request.name, request.payload)
            except Exception as exc:
                log.exception("direct method %s failed", request.name)
                status, payload = 500, {"error": f"{type(exc).__name__}: the method failed (see the log)"}
            try:
                self.client.send_method_response(
                    MethodResponse.create_from_method_request(request, status, payload)
                )
            except Exception as exc:
                log.warning("could not answer direct method %s: %s", request.name, exc)
                return
            log.info(
                "direct method %s answered %d in %.0f ms",
                request.name,
                status,
                (time.perf_counter() - started) * 1000,
            )

        self.client.on_method_request_received = on_request

    # -- reported properties -----------------------------------------------------------
    def report_running(self) -> None:
        self._patch_reported({"runtime": {"version": __version__, "startedAt": _utc_now()}})

    def report_status(self, snapshot: dict[str, Any]) -> None:
        """What the module runs and how it is doing, when that changes and every StatusEverySeconds.

        Like the Greengrass health report: no scan identifier, and only the
        counters an operator of a fleet acts on.
        """
        counters = snapshot.get("counters") or {}
        drift = snapshot.get("drift") or {}
        status = {
            "state": snapshot.get("state"),
            "reason": snapshot.get("reason") or "",
            "model": twin_safe(snapshot.get("model") or {}),
            "drift": {"state": drift.get("state", "off"), "reasons": "; ".join(drift.get("reasons") or [])},
            # The code only: the last error's subject is a scan reference or a message id.
            "lastErrorCode": code_in_line(snapshot.get("last_error")) or "",
        }
        meaning = json.dumps(status, sort_keys=True, default=str)
        now = time.monotonic()
        with self._lock:
            sent, every = self._status_sent, self._status_every_s
        if sent is not None and sent[0] == meaning and now - sent[1] < every:
            return
        status["counters"] = {
            k: counters.get(k)
            for k in ("received", "processed", "quarantined", "outbox_pending", "outbox_dropped", "queued")
            if k in counters
        }
        status["updatedAt"] = _utc_now()
        if self._patch_reported({"runtime": {"version": __version__}, "status": status}):
            with self._lock:
                self._status_sent = (meaning, now)

    def _patch_reported(self, patch: dict[str, Any]) -> bool:
        """Queue a reported-properties patch for the reporter thread (never blocks)."""
        with self._lock:
            self._reports.update(patch)
        self._reports_ready.set()
        return True

    def _report_loop(self) -> None:
        """Send queued reported properties while connected; what fails is sent with the next ones."""
        while True:
            self._reports_ready.wait()
            self._reports_ready.clear()
            with self._lock:
                patch, self._reports = self._reports, {}
                self._reporting = bool(patch)
            if self._closing.is_set():
                return
            if not patch:
                continue
            sent = False
            if self.connected:
                try:
                    self.client.patch_twin_reported_properties(twin_safe(patch))
                    sent = True
                except Exception as exc:
                    log.warning("could not update the module twin's reported properties: %s", exc)
            with self._lock:
                if not sent:  # newer values queued meanwhile win
                    self._reports = {**patch, **self._reports}
                self._reporting = False
            if not sent:
                self._closing.wait(2.0)
                self._reports_ready.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the queued reported properties are sent (True) or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._reports and not self._reporting:
                    return True
            time.sleep(0.05)
        return False

    # -- outputs -----------------------------------------------------------------------
    def send_output(self, output: str, payload: str, message_id: str) -> None:
        """Send one message to an edgeHub output; returns once edgeHub acknowledged it (PUBACK).

        Raises:
            PublishError: it was not taken (not connected, dropped, too large), saying what to do.
        """
        from azure.iot.device import Message

        message = Message(  # type: ignore[no-untyped-call]
            payload, message_id=message_id, content_encoding="utf-8", content_type="application/json"
        )
        try:
            self.client.send_message_to_output(message, output)
        except ValueError as exc:  # the SDK's size check (256 KB per message)
            raise PublishError(
                f"edgeHub output {output!r} refused a message of {len(payload.encode())} bytes: {exc}",
                action="IoT Hub messages are at most 256 KB; turn this output off (its Azure.*Output "
                "setting) or send the reports to the PACS/FHIR server instead. The result stays in the "
                "journal.",
            ) from exc
        except Exception as exc:
            raise PublishError(
                f"edgeHub output {output!r}: {type(exc).__name__}: {exc}",
                action="Check that edgeHub runs ('iotedge list', 'iotedge logs edgeHub'); results wait "
                "in the journal and are sent again.",
            ) from exc

    def close(self, timeout_s: float = 3.0) -> None:
        """Disconnect; bounded, because the SDK's shutdown waits for handlers still running."""
        self.flush(min(1.0, timeout_s))
        self._closing.set()
        self._twin_changed.set()
        self._reports_ready.set()

        def shutdown() -> None:
            try:
                self.client.shutdown()
            except Exception:
                log.debug("closing the IoT Edge module client failed", exc_info=True)

        closer = threading.Thread(target=shutdown, name="edgehub-shutdown", daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            log.warning("the IoT Edge module client did not shut down within %.0f s; leaving it", timeout_s)


def _create_client(environ: Mapping[str, str]) -> Any:
    try:
        from azure.iot.device import IoTHubModuleClient
    except ImportError as exc:
        raise EdgeRuntimeError(
            "The Azure IoT Edge module client (azure-iot-device) is not installed.",
            action="Install the runtime with its Azure extra: pip install '.[azure]' (the module "
            "image does).",
        ) from exc
    options = _client_options(environ)
    try:
        return IoTHubModuleClient.create_from_edge_environment(**options)
    except Exception as exc:
        raise EdgeRuntimeError(
            f"Could not set up the IoT Edge module client from its environment ({type(exc).__name__}: "
            f"{exc}).",
            action="The workload API (IOTEDGE_WORKLOADURI) must be reachable: check 'iotedge check' and "
            "that the module was started by edgeAgent from the deployment manifest.",
        ) from exc
