"""A fake Azure IoT Edge edgeHub (plus the workload API) for the UNMODIFIED ``azure-iot-device`` client.

Why: the runtime's IoT Edge module (edge_runtime/azure_edge.py) must be tested against the wire
protocol the real SDK speaks, not against a mock of the SDK. This fixture is a real Mosquitto with
TLS on 127.0.0.1:8883 (the SDK hard-codes port 8883), a "router" MQTT client inside the test
process that plays edgeHub's part of the IoT Hub MQTT protocol (twin, direct methods, module
outputs and inputs), and the IoT Edge workload API on a unix socket (trust bundle and SAS
signing), so ``IoTHubModuleClient.create_from_edge_environment()`` works unchanged with ``environ()``.

API (the integration tests rely on it exactly)::

    with FakeEdgeHub(tmp_path, desired={"threshold": 0.5}) as hub:   # or edgehub_or_skip(tmp_path)
        env = hub.environ()              # IOTEDGE_* variables for the module process
        hub.desired / hub.reported       # current twin sections, without "$version"
        hub.desired_version / hub.reported_version
        hub.reported_patches             # every reported patch the module sent, in order
        hub.patch_desired({"threshold": 0.7, "old": None})  # merge (None deletes), push; -> version
        hub.call_method("health", {"x": 1}, timeout=30)     # -> (status, payload); TimeoutError
        hub.outputs / hub.outputs_on("results")             # OutputMessage records
        hub.send_input("control", b"{}", {"k": "v"})
        hub.sign_requests                # SignRequest records (workload API), refused ones included
        hub.connects                     # CONNECTs by the module's client id, from Mosquitto's logs
        hub.stop_broker(); hub.start_broker()               # an edgeHub outage
        hub.wait_for(lambda: ..., timeout=20, what="...")   # AssertionError naming `what`

``edgehub_or_skip(workdir, **kw)`` returns a STARTED hub (``start()`` is idempotent, so ``with``
on it is fine too) or skips the test when Mosquitto is missing or 127.0.0.1:8883 is taken.

Protocol details the integration tests must know (all checked against azure-iot-device
2.15.0rc1 on paho-mqtt 2):

* Creating the client (``create_from_edge_environment``) already calls the workload API: one
  trust-bundle GET and the first sign request happen before any MQTT connect. A wrong module or
  generation id makes the workload API answer 404, and the SDK raises ``ValueError`` there.
* The SDK creates its paho client with ``CallbackAPIVersion.VERSION1`` (a ``DeprecationWarning``)
  and leaks paho's wake-up socket pair on every reconnect (a ``ResourceWarning``); under the
  suite's ``filterwarnings = error`` a test running the client in-process needs
  ``pytestmark = [pytest.mark.filterwarnings(f) for f in AZURE_SDK_WARNING_FILTERS]``.
* Outputs arrive on ``devices/{d}/modules/{m}/messages/events/<props>``; ``<props>`` is
  ``urlencode(..., quote_via=quote)``: system properties first in the order ``$.on``, ``$.mid``,
  ``$.cid``, ``$.uid``, ``$.ct``, ``$.ce`` (unset ones are left out), then the custom properties
  sorted by key, every value a string. ``OutputMessage.properties`` holds them decoded, keys
  included (``"%24.on"`` -> ``"$.on"``). The SDK sets no message id by itself.
* The client subscribes to a feature only when its handler is set (or, for the twin, on the
  first ``get_twin``/``patch_twin_reported_properties``); setting a handler returns after the
  SUBACK, so an input or method call made after that is delivered. Earlier ones are lost.
* The client connects with ``clean_session=False`` and NEVER resubscribes by itself: it relies
  on the hub keeping its session. Real edgeHub keeps sessions across restarts; so does this fake
  (Mosquitto persistence in the workdir, saved on ``stop_broker()``). ``stop_broker(
  keep_sessions=False)`` emulates an edgeHub that lost its state: the client then reconnects but
  never receives twin responses, desired patches, methods or inputs again.
* SAS renewal: the SDK renews ``120 s`` before expiry (``sastoken_ttl=125`` renews about 5 s after
  the client is created, and every ~5 s after that); each renewal is one sign request plus a
  disconnect and reconnect with the new token (``connects`` grows by one).
* During an outage the SDK retries the connection at once and then every
  ``connection_retry_interval`` (default 10 s), by itself. A ``send_message_to_output`` (or any
  other call) made while it is disconnected does NOT wait: with ``auto_connect`` (default) it
  tries one connect, and raises ``azure.iot.device.exceptions.ConnectionFailedError`` when that
  fails; the module must keep and resend the message. When that connect succeeds (edgeHub is
  back before the retry timer), the call reconnects the client at once.
* Twin responses: GET is answered ``$iothub/twin/res/200/?$rid=...`` with
  ``{"desired": {..., "$version": n}, "reported": {..., "$version": m}}`` (both start at 1); a
  reported patch is answered ``$iothub/twin/res/204/?$rid=...&$version=<new>``. The SDK's
  ``get_twin`` and ``patch_twin_reported_properties`` have no timeout of their own.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import gc
import hashlib
import hmac
import http.server
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MOSQUITTO = "/usr/sbin/mosquitto"
# The SDK connects to the gateway host on this port, always (common/mqtt_transport.py).
EDGEHUB_PORT = 8883
GATEWAY_HOSTNAME = "localhost"
IOTHUB_HOSTNAME = "fake-hub.azure-devices.net"
WORKLOAD_API_VERSION = "2019-01-30"


# pytest.mark.filterwarnings() arguments for tests that run the SDK's client in-process, each a
# third-party warning we cannot fix, scoped to the module that emits it: the SDK creates its paho
# client with the deprecated callback API 1; and each reconnect (SAS renewal, outage) restarts
# paho's loop after the SDK has cut its thread loose, so loop_start() drops the old wake-up
# socket pair unclosed.
#: IoT Hub's limits that Mosquitto does not know (Azure IoT Hub quotas and the twin's rules).
TWIN_SIZE_LIMIT = 32 * 1024
TWIN_DEPTH_LIMIT = 10
TWIN_STRING_LIMIT = 4 * 1024
METHOD_PAYLOAD_LIMIT = 128 * 1024


def twin_problems(value: Any, path: str = "", depth: int = 1) -> list[str]:
    """Why IoT Hub would refuse this twin patch: property names, nesting depth, string length."""
    problems: list[str] = []
    if isinstance(value, dict):
        if depth > TWIN_DEPTH_LIMIT:
            return [f"{path or '/'} nests deeper than {TWIN_DEPTH_LIMIT} levels"]
        for key, item in value.items():
            if any(char in key for char in ".$ ") and not (depth == 1 and key == "$version"):
                problems.append(f"property name {path}/{key!r} holds '.', '$' or a space")
            problems += twin_problems(item, f"{path}/{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += twin_problems(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, str) and len(value.encode()) > TWIN_STRING_LIMIT:
        problems.append(f"{path} is a string of {len(value.encode())} bytes (at most 4 KB)")
    return problems


def twin_size_problems(document: dict[str, Any]) -> list[str]:
    size = len(json.dumps(document, separators=(",", ":")).encode())
    if size <= TWIN_SIZE_LIMIT:
        return []
    return [f"the reported properties would be {size} bytes (at most 32 KB)"]


def collect_sdk_garbage() -> None:
    """Collect what the SDK's paho leaves behind (a wake-up socket pair per connection), here.

    Left to the garbage collector, those sockets are found during some later test, which then
    fails on their ResourceWarning (pytest reports it there as an unraisable exception). Test
    files that run the client in-process call this after each test.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


AZURE_SDK_WARNING_FILTERS = (
    "ignore:Callback API version 1 is deprecated:DeprecationWarning:azure.iot.device.common.mqtt_transport",
    "ignore:unclosed <socket.socket:ResourceWarning:paho.mqtt.client",
)


@dataclass
class OutputMessage:
    """One message the module sent to an output, as edgeHub's router saw it."""

    output: str
    body: bytes
    properties: dict[str, str]
    topic: str
    received_at: float


@dataclass
class SignRequest:
    """One call to the workload API's sign endpoint (accepted or not: ``status`` says)."""

    module_id: str
    generation_id: str
    key_id: str
    algo: str
    data: str
    expiry: int
    at: float
    status: int = 200


@dataclass
class _PendingMethod:
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    payload: object = None


def json_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply ``patch`` to ``target`` in place the way the twin does (RFC 7386: None deletes).

    Why in place: ``desired``/``reported`` stay the same dict objects a test may hold on to.
    """
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            current = target.get(key)
            if not isinstance(current, dict):
                current = target[key] = {}
            json_merge(current, value)
        else:
            target[key] = copy.deepcopy(value)


def decode_properties(encoded: str) -> dict[str, str]:
    """Decode the ``k=v&k2=v2`` property bag the SDK puts at the end of a topic.

    Why by hand: ``parse_qs`` turns ``+`` into a space, the SDK percent-encodes with ``quote``.
    """
    properties: dict[str, str] = {}
    for entry in encoded.split("&"):
        if not entry:
            continue
        key, _, value = entry.partition("=")
        properties[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return properties


def _topic_query(topic: str) -> dict[str, str]:
    """The ``$rid``/``$version`` pairs after ``?`` in a ``$iothub`` topic, ``$`` kept."""
    return decode_properties(topic.partition("?")[2])


def _port_in_use(host: str, port: int, family: socket.AddressFamily) -> bool:
    """Whether something listens on host:port (the client would reach it instead of our broker)."""
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    with probe:
        probe.settimeout(0.5)
        try:
            probe.connect((host, port))
        except OSError:
            return False
        return True


def _port_free_to_bind(port: int) -> bool:
    """Whether Mosquitto could bind 127.0.0.1:port (SO_REUSEADDR, as Mosquitto, so TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def edgehub_or_skip(workdir: Path, **kw: Any) -> FakeEdgeHub:
    """A started FakeEdgeHub, or skip the test when this machine cannot host one.

    Why skip rather than fail: the fake needs Debian's Mosquitto and the fixed port 8883 that the
    SDK hard-codes; neither is the code under test. ``.ci/run`` sets
    ``EDGE_RUNTIME_TESTS_REQUIRE_EDGEHUB=1``, which makes these a failure: CI installs both, so a
    skip there would hide the Azure IoT Edge tests.
    """

    def cannot(reason: str) -> None:
        if os.environ.get("EDGE_RUNTIME_TESTS_REQUIRE_EDGEHUB"):
            pytest.fail(f"{reason} (EDGE_RUNTIME_TESTS_REQUIRE_EDGEHUB is set: .ci/run needs these tests)")
        pytest.skip(reason)

    if not os.access(MOSQUITTO, os.X_OK):
        cannot(f"fake edgeHub needs Mosquitto at {MOSQUITTO} (apt-get install mosquitto)")
    if not _port_free_to_bind(EDGEHUB_PORT) or _port_in_use("127.0.0.1", EDGEHUB_PORT, socket.AF_INET):
        cannot(
            f"fake edgeHub needs 127.0.0.1:{EDGEHUB_PORT} (hard-coded in azure-iot-device), which is in use"
        )
    if _port_in_use("::1", EDGEHUB_PORT, socket.AF_INET6):
        cannot(f"[::1]:{EDGEHUB_PORT} is in use: the client would reach it as 'localhost' instead")
    hub = FakeEdgeHub(workdir, **kw)
    hub.start()
    return hub


def _write_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for localhost/127.0.0.1, as PEM files.

    Why a CA and not a self-signed leaf: the SDK verifies the server against the workload API's
    trust bundle with hostname checking on, exactly as it does against a real edgeHub.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake edgeHub test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GATEWAY_HOSTNAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(GATEWAY_HOSTNAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


class _WorkloadServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The IoT Edge workload API's socket; each request on its own daemon thread."""

    daemon_threads = True
    hub: FakeEdgeHub


class _WorkloadHandler(http.server.BaseHTTPRequestHandler):
    """GET /trust-bundle and POST /modules/{m}/genid/{g}/sign, as iotedged answers them."""

    server: _WorkloadServer

    def address_string(self) -> str:
        # A unix socket's peer address is '' (not a (host, port) tuple, which the base class indexes).
        return "workload-client"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output should not fill with one access-log line per token renewal."""

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if "api-version" not in urllib.parse.parse_qs(url.query):
            self._reply(400, {"message": "api-version is required"})
        elif url.path == "/trust-bundle":
            self._reply(200, {"certificate": self.server.hub.ca_pem})
        else:
            self._reply(404, {"message": f"no such resource: {url.path}"})

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        match = re.fullmatch(r"/modules/([^/]+)/genid/([^/]+)/sign", url.path)
        if match is None:
            self._reply(404, {"message": f"no such resource: {url.path}"})
            return
        if "api-version" not in urllib.parse.parse_qs(url.query):
            self._reply(400, {"message": "api-version is required"})
            return
        try:
            body = json.loads(raw)
            to_sign = base64.b64decode(body["data"], validate=True)
        except (ValueError, KeyError, TypeError) as e:
            self._reply(400, {"message": f"bad sign request: {e}"})
            return
        status, reply = self.server.hub._sign(
            module_id=urllib.parse.unquote(match.group(1)),
            generation_id=urllib.parse.unquote(match.group(2)),
            key_id=str(body.get("keyId", "")),
            algo=str(body.get("algo", "")),
            to_sign=to_sign,
        )
        self._reply(status, reply)


class FakeEdgeHub:
    """edgeHub for one module: Mosquitto over TLS on 127.0.0.1:8883, a router, the workload API.

    A context manager; ``start()``/``stop()`` do the same by hand. ``stop()`` always leaves no
    Mosquitto running, whatever state ``start()`` got to.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        device_id: str = "box-1",
        module_id: str = "HealthDiagEdgeInference",
        desired: dict[str, Any] | None = None,
        generation_id: str = "gen-1",
    ) -> None:
        self.workdir = Path(workdir) / "edgehub"
        self.device_id = device_id
        self.module_id = module_id
        self.generation_id = generation_id
        self.hub_hostname = IOTHUB_HOSTNAME
        self.client_id = f"{device_id}/{module_id}"
        self.module_key = os.urandom(32)

        self.desired: dict[str, Any] = copy.deepcopy(desired or {})
        self.desired_version = 1
        self.reported: dict[str, Any] = {}
        self.reported_version = 1
        self.reported_patches: list[dict[str, Any]] = []
        #: What IoT Hub would have refused (twin rules, size limits): the tests assert it stays empty.
        self.refusals: list[str] = []
        self.outputs: list[OutputMessage] = []
        self.sign_requests: list[SignRequest] = []
        self.ca_pem = ""

        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._pending_methods: dict[str, _PendingMethod] = {}
        self._broker: subprocess.Popen[bytes] | None = None
        self._broker_starts = 0
        self._router: mqtt.Client | None = None
        self._router_ready = threading.Event()
        self._workload: _WorkloadServer | None = None
        self._workload_thread: threading.Thread | None = None
        self._socket_dir: Path | None = None
        self._started = False
        self.socket_path = self.workdir / "workload.sock"

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeEdgeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Certificates, workload API, Mosquitto, router; returns once the router is subscribed."""
        if self._started:
            return
        self._started = True
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.ca_path, self.cert_path, self.key_path = _write_certs(self.workdir)
            self.ca_pem = self.ca_path.read_text()
            self._start_workload_api()
            self.start_broker(wait_for_router=False)
            self._start_router()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Router, Mosquitto and the workload API down; safe to call twice or after a failed start."""
        self._started = False
        router, self._router = self._router, None
        if router is not None:
            router.disconnect()
            router.loop_stop()
        self.stop_broker()
        server, self._workload = self._workload, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._workload_thread is not None:
            self._workload_thread.join(5)
            self._workload_thread = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def environ(self) -> dict[str, str]:
        """The variables iotedged gives a module's container, pointing at this fake."""
        return {
            "IOTEDGE_IOTHUBHOSTNAME": self.hub_hostname,
            "IOTEDGE_DEVICEID": self.device_id,
            "IOTEDGE_MODULEID": self.module_id,
            "IOTEDGE_GATEWAYHOSTNAME": GATEWAY_HOSTNAME,
            "IOTEDGE_MODULEGENERATIONID": self.generation_id,
            "IOTEDGE_WORKLOADURI": f"unix://{self.socket_path}",
            "IOTEDGE_APIVERSION": WORKLOAD_API_VERSION,
            "IOTEDGE_AUTHSCHEME": "sasToken",
        }

    # -- workload API ----------------------------------------------------------------------------

    def _start_workload_api(self) -> None:
        # sun_path holds 108 bytes: a deep pytest tmp_path would not fit, so fall back to /tmp.
        if len(os.fsencode(self.socket_path)) > 100:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="edgehub-"))
            self.socket_path = self._socket_dir / "workload.sock"
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = _WorkloadServer(str(self.socket_path), _WorkloadHandler)
        server.hub = self
        self._workload = server
        self._workload_thread = threading.Thread(
            target=server.serve_forever, name="edgehub-workload", daemon=True
        )
        self._workload_thread.start()

    def _sign(
        self, *, module_id: str, generation_id: str, key_id: str, algo: str, to_sign: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Sign as iotedged does, for this module's id and generation only; record every request."""
        data = to_sign.decode("utf-8", errors="replace")
        try:
            expiry = int(data.rsplit("\n", 1)[-1])
        except ValueError:
            expiry = -1
        if module_id != self.module_id or generation_id != self.generation_id:
            status, reply = 404, {"message": f"Module not found: {module_id} (generation {generation_id})"}
        elif key_id != "primary" or algo != "HMACSHA256":
            status, reply = 400, {"message": f"unsupported keyId/algo: {key_id}/{algo}"}
        else:
            digest = hmac.new(self.module_key, to_sign, hashlib.sha256).digest()
            status, reply = 200, {"digest": base64.b64encode(digest).decode()}
        with self._lock:
            self.sign_requests.append(
                SignRequest(module_id, generation_id, key_id, algo, data, expiry, time.time(), status)
            )
        return status, reply

    # -- broker ----------------------------------------------------------------------------------

    @property
    def _log_files(self) -> list[Path]:
        return sorted(self.workdir.glob("mosquitto-*.log"))

    def start_broker(self, *, wait_for_router: bool = True) -> None:
        """Start Mosquitto on 8883 with the same certificates and saved sessions; wait for the router.

        Why a new log file per start: ``connects`` counts across restarts without depending on
        whether Mosquitto appends to or truncates its log.
        """
        if self._broker is not None:
            return
        self._broker_starts += 1
        log = self.workdir / f"mosquitto-{self._broker_starts}.log"
        conf = self.workdir / "mosquitto.conf"
        # As root, Mosquitto drops to user `mosquitto`, which cannot read pytest's 0700 temp dirs.
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}"
            f"listener {EDGEHUB_PORT} 127.0.0.1\n"
            f"cafile {self.ca_path}\ncertfile {self.cert_path}\nkeyfile {self.key_path}\n"
            "allow_anonymous true\n"
            # edgeHub keeps sessions (subscriptions, queued QoS 1 messages) across restarts, and the
            # SDK depends on it: it connects with clean_session=False and never resubscribes.
            f"persistence true\npersistence_location {self.workdir}/\npersistence_file mosquitto.db\n"
            f"log_dest file {log}\nlog_type all\nlog_timestamp true\nconnection_messages true\n"
        )
        self._broker = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not _port_in_use("127.0.0.1", EDGEHUB_PORT, socket.AF_INET):
            if self._broker.poll() is not None or time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop_broker()
                raise RuntimeError(f"Mosquitto did not start on 127.0.0.1:{EDGEHUB_PORT}; log:\n{tail}")
            time.sleep(0.05)
        if wait_for_router and self._router is not None:
            self.wait_for(self._router_ready.is_set, 15, "the router to reconnect and resubscribe")

    def stop_broker(self, *, keep_sessions: bool = True) -> None:
        """An edgeHub outage: Mosquitto goes away (SIGTERM, so it saves its sessions as edgeHub does).

        ``keep_sessions=False`` deletes the saved sessions too, as if edgeHub lost its store. The
        router and the workload API keep running; the router reconnects once the broker is back.
        """
        broker, self._broker = self._broker, None
        if broker is not None:
            self._router_ready.clear()
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(timeout=5)
        if not keep_sessions:
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / "mosquitto.db").unlink()

    def _log_tail(self, lines: int = 20) -> str:
        text = "".join(path.read_text(errors="replace") for path in self._log_files)
        return "\n".join(text.splitlines()[-lines:])

    @property
    def connects(self) -> int:
        """How many times the module's client completed an MQTT CONNECT (from Mosquitto's logs)."""
        pattern = re.compile(rf"New client connected from \S+ as {re.escape(self.client_id)} \(")
        return sum(len(pattern.findall(path.read_text(errors="replace"))) for path in self._log_files)

    # -- router ----------------------------------------------------------------------------------

    def _start_router(self) -> None:
        """edgeHub's side of the protocol as an MQTT client of the same broker.

        Why a persistent session and subscribing in on_connect: after a broker restart paho
        reconnects by itself, and nothing the module publishes meanwhile may be lost.
        """
        router = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id="fake-edgehub-router",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        router.tls_set_context(ssl.create_default_context(cafile=str(self.ca_path)))
        router.reconnect_delay_set(min_delay=1, max_delay=2)
        router.on_connect = self._on_router_connect
        router.on_disconnect = self._on_router_disconnect
        router.on_subscribe = self._on_router_subscribe
        router.on_message = self._on_router_message
        self._router = router
        router.connect("127.0.0.1", EDGEHUB_PORT, keepalive=30)
        router.loop_start()
        self.wait_for(self._router_ready.is_set, 15, "the router to subscribe")

    def _router_topics(self) -> list[tuple[str, int]]:
        base = f"devices/{self.device_id}/modules/{self.module_id}"
        # Explicit $iothub filters: '#' and '+' at the first level do not match '$' topics.
        return [
            (f"{base}/messages/events/#", 1),
            ("$iothub/twin/GET/#", 1),
            ("$iothub/twin/PATCH/properties/reported/#", 1),
            ("$iothub/methods/res/#", 1),
        ]

    def _on_router_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if not reason_code.is_failure:
            client.subscribe(self._router_topics())

    def _on_router_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._router_ready.clear()

    def _on_router_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        self._router_ready.set()

    def _publish(self, topic: str, payload: bytes) -> None:
        router = self._router
        if router is None:
            raise RuntimeError("the fake edgeHub is not running")
        router.publish(topic, payload, qos=1)

    def _on_router_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        events = f"devices/{self.device_id}/modules/{self.module_id}/messages/events/"
        if topic.startswith(events):
            properties = decode_properties(topic[len(events) :])
            message = OutputMessage(
                properties.get("$.on", ""), bytes(msg.payload), properties, topic, time.time()
            )
            with self._lock:
                self.outputs.append(message)
        elif topic.startswith("$iothub/twin/GET/"):
            rid = _topic_query(topic).get("$rid", "")
            with self._lock:
                twin = {
                    "desired": {**copy.deepcopy(self.desired), "$version": self.desired_version},
                    "reported": {**copy.deepcopy(self.reported), "$version": self.reported_version},
                }
            self._publish(f"$iothub/twin/res/200/?$rid={rid}", json.dumps(twin).encode())
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            rid = _topic_query(topic).get("$rid", "")
            try:
                patch = json.loads(msg.payload)
                if not isinstance(patch, dict):
                    raise ValueError("a reported patch is a JSON object")
            except ValueError:
                self._publish(f"$iothub/twin/res/400/?$rid={rid}", b"")
                return
            with self._lock:
                merged = copy.deepcopy(self.reported)
                json_merge(merged, patch)
                problems = twin_problems(patch) + twin_size_problems(merged)
                if problems:  # what IoT Hub refuses (400), recorded for the tests to assert on
                    self.refusals.append(f"reported patch: {'; '.join(problems)}")
                    self._publish(f"$iothub/twin/res/400/?$rid={rid}", b"")
                    return
                self.reported_patches.append(patch)
                json_merge(self.reported, patch)
                self.reported_version += 1
                version = self.reported_version
            self._publish(f"$iothub/twin/res/204/?$rid={rid}&$version={version}", b"")
        elif topic.startswith("$iothub/methods/res/"):
            status = int(urllib.parse.unquote(topic.split("/")[3]))
            rid = _topic_query(topic).get("$rid", "")
            try:
                payload: object = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                payload = msg.payload
            with self._lock:
                pending = self._pending_methods.get(rid)
                if len(msg.payload) > METHOD_PAYLOAD_LIMIT:
                    self.refusals.append(f"method response of {len(msg.payload)} bytes (IoT Hub: 128 KB)")
            if pending is not None:
                pending.status, pending.payload = status, payload
                pending.done.set()

    # -- what a test does ------------------------------------------------------------------------

    def patch_desired(self, patch: dict[str, Any]) -> int:
        """Merge ``patch`` into desired (None deletes), bump ``$version``, push it; return the version."""
        with self._lock:
            json_merge(self.desired, patch)
            self.desired_version += 1
            version = self.desired_version
        body = json.dumps({**patch, "$version": version}).encode()
        self._publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body)
        return version

    def call_method(self, name: str, payload: object = None, timeout: float = 30) -> tuple[int, object]:
        """Invoke a direct method on the module; (status, payload) of its response.

        Raises TimeoutError when no response comes (the module is not subscribed, or never answers).
        """
        rid = str(next(self._rids))
        pending = _PendingMethod()
        with self._lock:
            self._pending_methods[rid] = pending
        try:
            quoted = urllib.parse.quote(name, safe="")
            self._publish(f"$iothub/methods/POST/{quoted}/?$rid={rid}", json.dumps(payload).encode())
            if not pending.done.wait(timeout):
                raise TimeoutError(f"direct method {name!r} got no response within {timeout} s")
            return pending.status, pending.payload
        finally:
            with self._lock:
                self._pending_methods.pop(rid, None)

    def outputs_on(self, name: str) -> list[OutputMessage]:
        """The messages the module sent to output ``name``, in order."""
        with self._lock:
            return [message for message in self.outputs if message.output == name]

    def send_input(self, name: str, body: bytes, properties: dict[str, str] | None = None) -> None:
        """Route ``body`` to the module's input ``name``, properties encoded as edgeHub does."""
        encoded = urllib.parse.urlencode(list((properties or {}).items()), quote_via=urllib.parse.quote)
        quoted = urllib.parse.quote(name, safe="")
        self._publish(f"devices/{self.device_id}/modules/{self.module_id}/inputs/{quoted}/{encoded}", body)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
        """Poll ``predicate`` until true; AssertionError naming ``what`` (and the broker log) if not."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what or predicate!r}; "
                    f"module connects={self.connects}; Mosquitto log tail:\n{self._log_tail(10)}"
                )
            time.sleep(0.05)
