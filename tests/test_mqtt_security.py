"""Secured MQTT against a real Mosquitto: TLS, mutual TLS, username/password.

The fixture makes a throw-away CA, a broker certificate for 127.0.0.1 and a
client certificate with ``openssl``, and a password file with
``mosquitto_passwd``.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import Broker

from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import ConfigError
from edge_runtime.sinks.mqtt import MqttSink


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=HealthDiag test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "edge-box-01")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *ext,
            cwd=d,
        )
    # A second CA that did not sign the broker certificate.
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Some other CA",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        cwd=d,
    )
    for f in d.iterdir():
        os.chmod(f, 0o644)  # mosquitto drops root privileges before reading its key
    os.chmod(d, 0o755)
    return d


@pytest.fixture()
def broker_factory(tmp_path: Path, mosquitto):  # `mosquitto` skips when it is not installed
    brokers: list[Broker] = []

    def make(extra: str, allow_anonymous: bool = True) -> Broker:
        workdir = tmp_path / f"broker{len(brokers)}"
        workdir.mkdir()
        os.chmod(workdir, 0o777)
        broker = Broker(workdir, extra, allow_anonymous)
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def _publisher(tmp_path: Path, broker: Broker, **mqtt) -> MqttSink:
    mqtt.setdefault("ClientId", f"sec-{time.monotonic_ns()}")
    config = RuntimeConfig.from_mapping({"Mqtt": {"Host": "127.0.0.1", "Port": broker.port, **mqtt}})
    return MqttSink(config.mqtt)


def _connects(publisher: MqttSink, timeout_s: float = 5.0) -> bool:
    publisher.start()
    try:
        return publisher.wait_connected(timeout_s)
    finally:
        publisher.stop(timeout_s=1)


def test_tls_with_server_verification(pki: Path, broker_factory, tmp_path: Path):
    broker = broker_factory(f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key")
    ok = _publisher(tmp_path, broker, Tls={"Enabled": True, "CaFile": str(pki / "ca.crt")})
    assert _connects(ok)
    plain = _publisher(tmp_path, broker)  # a client that does not speak TLS gets nowhere
    assert not _connects(plain, timeout_s=2)


# paho-mqtt 2.2's Client._ssl_wrap_socket does not close its SSLSocket when do_handshake()
# raises (here on purpose: an untrusted CA), so each failed attempt leaves one for the garbage
# collector, which reports it as unclosed. Not ours to close; gc.collect() below keeps the
# report inside this test, so the ignore covers nothing else.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_tls_with_an_untrusted_ca_is_reported_as_verification_failure(
    pki: Path, broker_factory, tmp_path: Path, caplog
):
    broker = broker_factory(f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key")
    wrong = _publisher(tmp_path, broker, Tls={"Enabled": True, "CaFile": str(pki / "other.crt")})
    with caplog.at_level(logging.ERROR, logger="edge_runtime.sinks.mqtt"):
        assert not _connects(wrong, timeout_s=2)
    assert "TLS verification of the MQTT broker" in caplog.text
    assert "CaFile" in caplog.text
    assert wrong.problem_code == "mqtt_tls_verify_failed"
    gc.collect()


def test_mutual_tls(pki: Path, broker_factory, tmp_path: Path, caplog):
    broker = broker_factory(
        f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n"
        "require_certificate true\nuse_identity_as_username true"
    )
    tls = {"Enabled": True, "CaFile": str(pki / "ca.crt")}
    with_cert = _publisher(
        tmp_path, broker, Tls={**tls, "CertFile": str(pki / "client.crt"), "KeyFile": str(pki / "client.key")}
    )
    assert _connects(with_cert)
    without = _publisher(tmp_path, broker, Tls=tls)
    assert not _connects(without, timeout_s=2)


def test_username_and_password(broker_factory, tmp_path: Path, caplog):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "edge", "s3cret"], check=True)
    os.chmod(passwd, 0o644)
    broker = broker_factory(f"password_file {passwd}", allow_anonymous=False)
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    assert _connects(_publisher(tmp_path, broker, Username="edge", PasswordFile=str(secret)))
    assert _connects(_publisher(tmp_path, broker, Username="edge", Password="s3cret"))
    wrong = _publisher(tmp_path, broker, Username="edge", Password="wrong")
    with caplog.at_level(logging.ERROR, logger="edge_runtime.sinks.mqtt"):
        assert not _connects(wrong, timeout_s=2)
    assert "authentication failed for user 'edge'" in caplog.text
    assert "timed out" not in caplog.text
    # The status says so too (it said "broker not reachable" with no last_error): as the code and
    # its fixed text, naming the settings to check; the user name is in the log only.
    assert wrong.problem_code == "mqtt_auth_failed"
    assert wrong.problem is not None and "rejected our credentials" in wrong.problem
    assert "Mqtt.Username" in wrong.problem and "'edge'" not in wrong.problem


def test_two_boxes_with_one_client_id_are_named_as_the_cause(broker_factory, tmp_path: Path, caplog):
    """They took the session from each other every second with only 'lost (Unspecified error)'."""
    broker = broker_factory("")
    boxes = [_publisher(tmp_path, broker, ClientId="ward-3-box") for _ in range(2)]
    with caplog.at_level(logging.ERROR, logger="edge_runtime.sinks.mqtt"):
        for box in boxes:
            box.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(box.problem for box in boxes):
                time.sleep(0.1)
            problems = [box.problem for box in boxes if box.problem]
        finally:
            for box in boxes:
                box.stop(timeout_s=1)
    assert problems, "a ClientId takeover went unnamed"
    # The status: the code and its fixed text; the log names the ClientId.
    assert "mqtt_client_id_conflict" in problems[0] and "same Mqtt.ClientId" in problems[0]
    assert "ward-3-box" not in problems[0]
    assert "same Mqtt.ClientId (ward-3-box)" in caplog.text


def test_missing_or_bad_certificate_stops_start_up_naming_the_file(pki: Path, tmp_path: Path):
    broker = Broker(tmp_path)  # never started: construction must already fail
    with pytest.raises(ConfigError, match=r"CA file .*nope\.crt does not exist"):
        _publisher(tmp_path, broker, Tls={"Enabled": True, "CaFile": str(tmp_path / "nope.crt")})
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"garbage\.crt"):
        _publisher(tmp_path, broker, Tls={"Enabled": True, "CaFile": str(garbage)})
    with pytest.raises(ConfigError, match=r"client certificate/key .*client\.crt"):
        _publisher(
            tmp_path,
            broker,
            Tls={
                "Enabled": True,
                "CaFile": str(pki / "ca.crt"),
                "CertFile": str(pki / "client.crt"),
                "KeyFile": str(pki / "server.key"),
            },
        )
