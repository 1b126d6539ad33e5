"""The admin page's endpoints and actions over real HTTP, against the real service.

The service runs with a real broker and the bundled model; requests go over
loopback to the page it serves (uvicorn, as in production). What a browser
sees and does is in test_admin_browser.py; here: what machines read
(/health/*, /api/status, /metrics parsed by prometheus_client's own parser),
and every security rule the page promises, each refused as it must be.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import drop
from helpers import service_config as make_config
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.admin import RecentLogs
from edge_runtime.admin.app import SECURITY_HEADERS
from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import ConfigError
from edge_runtime.privacy import REDACTOR
from edge_runtime.service import EdgeService

NORMAL = "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"
TOKEN = "s3cret-admin-token-0123456789"


def config_with(base: RuntimeConfig, **admin: Any) -> RuntimeConfig:
    data = base.to_pascal_dict()
    data["Admin"] = {**data["Admin"], **admin}
    return RuntimeConfig.from_mapping(data)


@pytest.fixture()
def start_service(tmp_path: Path, mosquitto, default_bundle: Path) -> Iterator[Callable[..., EdgeService]]:
    services: list[EdgeService] = []

    def start(**admin: Any) -> EdgeService:
        config = config_with(make_config(tmp_path, mosquitto, default_bundle), **admin)
        service = EdgeService(config)
        services.append(service)
        service.start()
        assert service.admin is not None
        return service

    yield start
    for service in services:
        service.stop()


def wait_for(check: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def csrf_of(client: httpx.Client, path: str) -> str:
    """The hidden CSRF field of a page (the client keeps the session cookie it came with)."""
    page = client.get(path, headers={"accept": "text/html"})
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, "the page has no CSRF field"
    return match.group(1)


def metrics_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_machines_read_health_status_and_metrics(start_service, shared_data: Path) -> None:
    service = start_service()
    config = service.config
    drop(shared_data / NORMAL, config.inbox.path, "normal.jpeg")
    drop(shared_data / NORMAL, config.inbox.path, "again.jpeg")  # the same content: a duplicate
    (config.inbox.path / "broken.jpeg").write_bytes(b"not an image at all")
    wait_for(
        lambda: service.counters["processed"] >= 1 and service.counters["quarantined"] >= 1, what="scans"
    )
    wait_for(lambda: service.counters["duplicates"] >= 1, what="the duplicate")
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        live = client.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "live"}
        ready = client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "ready": True,
            "checks": {"service": None, "model": None, "conformance": None, "journal": None},
        }

        status = client.get("/api/status").json()
        assert status["counters"]["processed"] == 1 and status["counters"]["quarantined"] == 1
        assert status["model"]["name"] == "pneumonia-cxr"
        assert status["model"]["conformance"]["verdict"] == "passed"
        assert status["model"]["sha256"] == service.analyzer.model_info["sha256"]
        assert status["quarantine"]["files"] == 1
        assert {s["name"] for s in status["sinks"]} == {d.name for d in service.drainers}
        assert status["intended_use"]["results_since_start"] == 1

        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = metrics_of(response.text)
    assert metrics[("edge_runtime_scans_total", (("outcome", "processed"),))] == 1
    assert metrics[("edge_runtime_scans_total", (("outcome", "quarantined"),))] == 1
    assert metrics[("edge_runtime_scans_total", (("outcome", "duplicates"),))] == 1
    assert metrics[("edge_runtime_inference_seconds_count", ())] == 1
    assert metrics[("edge_runtime_decode_seconds_count", ())] == 1
    assert metrics[("edge_runtime_quarantine_files", ())] == 1
    assert metrics[("edge_runtime_ready", ())] == 1
    assert metrics[("edge_runtime_conformance_passed", ())] == 1
    assert ("edge_runtime_outbox_pending", (("sink", "mqtt"),)) in metrics
    assert metrics[("edge_runtime_outbox_dropped_total", (("sink", "mqtt"),))] == 0
    assert metrics[("edge_runtime_outside_intended_use_share", ())] == 0.0
    assert metrics[("edge_runtime_status_errors", ())] == 0


def test_a_part_that_cannot_be_read_leaves_the_rest_of_the_status(start_service, monkeypatch) -> None:
    service = start_service()

    def broken() -> dict:
        raise OSError("disk I/O error")

    monkeypatch.setattr(service.journal, "backlog_by_sink", broken)
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        status = client.get("/api/status")
        assert status.status_code == 200
        # The health snapshot reads the backlog too: both say so, the model and the rest still answer.
        assert status.json()["errors"] == {
            "health": "OSError reading health",
            "sinks": "OSError reading sinks",
        }
        assert status.json()["model"]["name"] == "pneumonia-cxr"
        metrics = metrics_of(client.get("/metrics").text)
        assert metrics[("edge_runtime_status_errors", ())] == 2
        assert "Could not read sinks" in client.get("/", headers={"accept": "text/html"}).text


def test_a_page_bound_to_loopback_refuses_other_host_names(start_service) -> None:
    """DNS rebinding: a web page whose domain now resolves to 127.0.0.1 must not reach the page."""
    service = start_service()
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        assert client.get("/api/status", headers={"host": "evil.example:8380"}).status_code == 400
        assert client.get("/metrics", headers={"host": "evil.example"}).status_code == 400
        for host in ("localhost", f"127.0.0.1:{service.admin.port}", f"localhost:{service.admin.port}"):
            assert client.get("/health/live", headers={"host": host}).status_code == 200, host


def test_every_response_carries_the_security_headers(start_service) -> None:
    service = start_service()
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        for path in (
            "/",
            "/scans",
            "/quarantine",
            "/destinations",
            "/logs",
            "/api/status",
            "/metrics",
            "/health/live",
            "/scans/no-such-scan",
            "/static/admin.css",
        ):
            response = client.get(path, headers={"accept": "text/html"})
            for name, value in SECURITY_HEADERS.items():
                assert response.headers.get(name) == value, (path, name)
            assert "server" not in response.headers, path
    csp = SECURITY_HEADERS["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp


def test_a_page_off_this_machine_needs_a_token(tmp_path: Path, mosquitto, default_bundle: Path) -> None:
    base = make_config(tmp_path, mosquitto, default_bundle)
    with pytest.raises(ConfigError, match=r"Admin\.TokenFile"):
        config_with(base, Bind="127.0.0.2")


def test_off_loopback_every_page_but_liveness_asks_for_the_token(start_service, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    service = start_service(Bind="127.0.0.2", TokenFile=str(token_file))
    assert service.admin.url.startswith("http://127.0.0.2:")
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        assert client.get("/health/live").status_code == 200
        for path in ("/api/status", "/metrics", "/health/ready", "/scans", "/quarantine", "/logs"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert "pneumonia-cxr" not in refused.text
        assert (
            client.get("/metrics", headers={"authorization": "Bearer wrong-token-wrong-token"}).status_code
            == 401
        )
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert client.get("/metrics", headers=bearer).status_code == 200
        assert client.get("/api/status", headers=bearer).json()["model"]["name"] == "pneumonia-cxr"
        # A browser is sent to sign in, and comes back where it was going.
        page = client.get("/quarantine", headers={"accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/quarantine"
        csrf = csrf_of(client, "/login")
        wrong = client.post("/login", data={"csrf": csrf, "token": "not-the-token-at-all", "next": "/"})
        assert wrong.status_code == 401
        assert client.get("/", headers={"accept": "text/html"}).status_code == 303
        signed = client.post("/login", data={"csrf": csrf, "token": TOKEN, "next": "//evil.example/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/"  # never another host
        assert client.get("/", headers={"accept": "text/html"}).status_code == 200
        cookie = next(c for c in client.cookies.jar if c.name == "edge_admin")
        assert cookie.has_nonstandard_attr("HttpOnly") or "httponly" in str(cookie._rest).lower()
        csrf = csrf_of(client, "/")
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/api/status").status_code == 401


def test_short_token_and_busy_port_refuse_the_start(tmp_path: Path, mosquitto, default_bundle: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("too-short\n")
    base = make_config(tmp_path, mosquitto, default_bundle)
    with pytest.raises(ConfigError, match=r"at least 16"):
        EdgeService(config_with(base, Bind="127.0.0.2", TokenFile=str(short)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        service = EdgeService(config_with(base, Port=port))
        try:
            with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is in use") as refused:
                service.start()
            assert "Admin.Port" in refused.value.action
        finally:
            service.stop()


def wait_quarantined(config: RuntimeConfig, name: str) -> Path:
    error_file = config.inbox.quarantine_path / f"{name}.error.json"
    wait_for(error_file.exists, what=f"{name} quarantined")
    return error_file


def test_retry_and_discard_are_confirmed_posts_journaled_and_never_delete(
    start_service, shared_data: Path
) -> None:
    service = start_service()
    config = service.config
    quarantine = config.inbox.quarantine_path
    for name in ("fixme.jpeg", "junk.jpeg"):
        (config.inbox.path / name).write_bytes(b"\xff\xd8\xff truncated jpeg " + name.encode())
    fix_ref = json.loads(wait_quarantined(config, "fixme.jpeg").read_text())["ref"]
    junk_ref = json.loads(wait_quarantined(config, "junk.jpeg").read_text())["ref"]
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        listing = client.get("/quarantine", headers={"accept": "text/html"}).text
        assert fix_ref in listing and junk_ref in listing and "corrupt_image" in listing
        assert "fixme.jpeg" not in listing  # names only under Privacy.PublishFileNames
        csrf = csrf_of(client, f"/quarantine/{fix_ref}/retry")
        # Without the form's token, or from another site: refused, nothing moves.
        assert client.post(f"/quarantine/{fix_ref}/retry", data={}).status_code == 403
        assert client.post(f"/quarantine/{fix_ref}/retry", data={"csrf": "forged"}).status_code == 403
        foreign = client.post(
            f"/quarantine/{fix_ref}/retry", data={"csrf": csrf}, headers={"origin": "http://evil.example"}
        )
        assert foreign.status_code == 403
        assert (quarantine / "fixme.jpeg").exists()
        # The admin fixes the file, then retries it: processed as a scan.
        shutil.copyfile(shared_data / NORMAL, quarantine / "fixme.jpeg")
        done = client.post(f"/quarantine/{fix_ref}/retry", data={"csrf": csrf})
        assert done.status_code == 303 and done.headers["location"] == "/quarantine?done=retry"
        wait_for(lambda: service.counters["processed"] >= 1, what="the retried scan's result")
        assert not (quarantine / "fixme.jpeg").exists()
        # Discard moves it aside, with its error file; nothing deleted.
        assert client.post(f"/quarantine/{junk_ref}/discard", data={"csrf": csrf}).status_code == 303
        assert (
            quarantine / "discarded" / "junk.jpeg"
        ).read_bytes() == b"\xff\xd8\xff truncated jpeg junk.jpeg"
        assert (quarantine / "discarded" / "junk.jpeg.error.json").exists()
        assert not (quarantine / "junk.jpeg").exists()
        again = client.post(f"/quarantine/{junk_ref}/discard", data={"csrf": csrf})
        assert again.status_code == 404
    actions = service.journal.admin_actions()
    assert [(a.action, a.ref) for a in actions] == [("discard", junk_ref), ("retry", fix_ref)]


def test_an_unchanged_file_retried_is_processed_again(start_service) -> None:
    service = start_service()
    config = service.config
    (config.inbox.path / "bad.jpeg").write_bytes(b"still not an image")
    error_file = wait_quarantined(config, "bad.jpeg")
    ref = json.loads(error_file.read_text())["ref"]
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        csrf = csrf_of(client, f"/quarantine/{ref}/retry")
        assert client.post(f"/quarantine/{ref}/retry", data={"csrf": csrf}).status_code == 303
    # The journal forgot the verdict, so the file went through the flow again (not just moved back).
    wait_for(lambda: service.counters["quarantined"] >= 2, what="the second quarantine")
    record = json.loads(wait_quarantined(config, "bad.jpeg").read_text())
    assert record["ref"] == ref and record["attempts"] == 1
    assert [a.action for a in service.journal.admin_actions()] == ["retry"]


def test_read_only_changes_nothing(start_service) -> None:
    service = start_service(ReadOnly=True)
    config = service.config
    (config.inbox.path / "bad.jpeg").write_bytes(b"not an image")
    ref = json.loads(wait_quarantined(config, "bad.jpeg").read_text())["ref"]
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        page = client.get("/quarantine", headers={"accept": "text/html"}).text
        assert "Read-only mode" in page and f"/quarantine/{ref}/retry" not in page
        csrf = csrf_of(client, f"/quarantine/{ref}/discard")
        assert client.post(f"/quarantine/{ref}/retry", data={"csrf": csrf}).status_code == 403
        assert client.post(f"/quarantine/{ref}/discard", data={"csrf": csrf}).status_code == 403
    assert (config.inbox.quarantine_path / "bad.jpeg").exists()
    assert service.journal.admin_actions() == []


def test_the_log_page_scrubs_names_even_where_logs_may_name_files() -> None:
    buffer = RecentLogs(capacity=3)
    logger = logging.getLogger("edge_runtime.test_admin")
    logger.addHandler(buffer)
    logger.setLevel(logging.INFO)
    enabled = REDACTOR.enabled
    REDACTOR.enabled = False  # Privacy.LogFileNames: true
    REDACTOR.register("Doe_Jane_19610523.dcm", "scan-0123456789abcdef.dcm")
    try:
        logger.info("decoded %s\nforged line", "Doe_Jane_19610523.dcm")
        for n in range(3):
            logger.info("line %d", n)
    finally:
        REDACTOR.forget("Doe_Jane_19610523.dcm")
        REDACTOR.enabled = enabled
        logger.removeHandler(buffer)
    lines = buffer.lines()
    assert [line.text for line in lines] == ["line 0", "line 1", "line 2"]  # bounded, oldest dropped
    buffer.resize(10)
    logger.addHandler(buffer)
    REDACTOR.register("Doe_Jane_19610523.dcm", "scan-0123456789abcdef.dcm")
    try:
        logger.info("decoded %s\nforged line", "Doe_Jane_19610523.dcm")
    finally:
        REDACTOR.forget("Doe_Jane_19610523.dcm")
        logger.removeHandler(buffer)
    assert buffer.lines()[-1].text == "decoded scan-0123456789abcdef.dcm\\nforged line"


def test_a_quarantined_link_is_never_followed_by_retry(start_service, tmp_path: Path) -> None:
    service = start_service()
    config = service.config
    secret = tmp_path / "outside-the-inbox.txt"
    secret.write_text("not the service's to read")
    (config.inbox.path / "link.jpeg").symlink_to(secret)
    error_file = wait_quarantined(config, "link.jpeg")
    ref = json.loads(error_file.read_text())["ref"]
    assert json.loads(error_file.read_text())["code"] == "symlink_refused"
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        csrf = csrf_of(client, f"/quarantine/{ref}/retry")
        refused = client.post(f"/quarantine/{ref}/retry", data={"csrf": csrf})
        assert refused.status_code == 409 and "not a regular file" in refused.json()["detail"]
        assert (config.inbox.quarantine_path / "link.jpeg").is_symlink()
        # Discarding it moves the link itself aside.
        assert client.post(f"/quarantine/{ref}/discard", data={"csrf": csrf}).status_code == 303
    assert (config.inbox.quarantine_path / "discarded" / "link.jpeg").is_symlink()
    assert secret.read_text() == "not the service's to read"


@pytest.mark.parametrize("layout", ["relative", "symlinked"])
def test_retry_works_with_an_inbox_path_written_as_the_admin_wrote_it(
    tmp_path: Path, mosquitto, default_bundle: Path, shared_data: Path, monkeypatch, layout: str
) -> None:
    """The inbox names files by their resolved path; a retried file must not look like a copy of itself."""
    base = make_config(tmp_path, mosquitto, default_bundle)
    data = base.to_pascal_dict()
    real = tmp_path / "data-disk"
    real.mkdir()
    if layout == "relative":
        monkeypatch.chdir(real)
        inbox = "inbox"
    else:
        (tmp_path / "var-lib").symlink_to(real)
        inbox = str(tmp_path / "var-lib" / "inbox")
    data["Inbox"] = {**data["Inbox"], "Path": inbox}
    service = EdgeService(RuntimeConfig.from_mapping(data))
    service.start()
    try:
        config = service.config
        config.inbox.path.mkdir(parents=True, exist_ok=True)
        (config.inbox.path / "bad.jpeg").write_bytes(b"not an image, retried unchanged")
        ref = json.loads(wait_quarantined(config, "bad.jpeg").read_text())["ref"]
        with httpx.Client(base_url=service.admin.url, timeout=10) as client:
            csrf = csrf_of(client, f"/quarantine/{ref}/retry")
            assert client.post(f"/quarantine/{ref}/retry", data={"csrf": csrf}).status_code == 303
            # A second click finds nothing left to do, and says so without naming the file.
            again = client.post(f"/quarantine/{ref}/retry", data={"csrf": csrf})
            assert again.status_code == 404 or "retried or discarded" in again.text
            assert "bad.jpeg" not in again.text
        # Processed again (quarantined again), not thrown away as a duplicate of itself.
        wait_for(lambda: service.counters["quarantined"] >= 2, what="the second quarantine")
        assert service.counters["duplicates"] == 0
        assert [row.state for row in service.journal.recent_scans()] == ["quarantined"]
    finally:
        service.stop()


def test_a_fault_of_the_page_is_a_plain_500_with_the_headers(start_service, monkeypatch) -> None:
    service = start_service()

    def broken() -> dict:
        raise RuntimeError("cannot read /srv/inbox/Doe_Jane_19610523.dcm")

    monkeypatch.setattr(service.admin.facts, "status", broken)
    with httpx.Client(base_url=service.admin.url, timeout=10) as client:
        for path in ("/api/status", "/"):
            response = client.get(path, headers={"accept": "text/html"})
            assert response.status_code == 500, path
            assert response.headers["content-security-policy"] == SECURITY_HEADERS["content-security-policy"]
            assert "Doe_Jane" not in response.text and "RuntimeError" not in response.text
        assert client.get("/health/live").status_code == 200  # the page still serves
