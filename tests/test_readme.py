"""What a newcomer types from the README works: the two set-up commands, every command line, the quick start.

* The quick start holds exactly two set-up commands, each right for root without sudo and for
  a user with it, and ``.ci/run`` runs the same set-up and the same test command.
* Every command line of this project's programs in the README and the other manuals is parsed
  by that program's own argument parser (``readme_commands.py``); every inline mention names a
  subcommand and options that exist.
* The quick start's second command is run as written against the service started as the first
  command starts it (loopback broker, its own folder), and the results it promises arrive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest
from readme_commands import commands, mentions, parse_in_child

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
MANUALS = [
    REPO / "README.md",
    REPO / "ARCHITECTURE.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(REPO.glob("*/README.md")),
]


def _quick_start() -> str:
    return README[README.index("## Quick start") : README.index("## What it does")]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_greengrass_examples_use_the_built_versions() -> None:
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    model = json.loads((REPO / "edge_runtime/models/pneumonia-cxr/manifest.json").read_text())["version"]
    manuals = "".join(m.read_text(encoding="utf-8") for m in MANUALS)
    merges = re.findall(r'--merge "([\w.]+)=([\d.]+)"', manuals)
    assert merges, "no manual has a greengrass-cli --merge example"
    expected = {"com.healthdiag.EdgeInference": runtime, "com.healthdiag.model.PneumoniaCXR": model}
    for component, version in merges:
        assert version == expected[component], (
            f"a manual deploys {component}={version}, the build makes {expected[component]}"
        )


def test_the_quick_start_has_two_setup_commands_that_work_with_and_without_sudo() -> None:
    blocks = [block.strip() for block in _bash_blocks(_quick_start())]
    install = [b for b in blocks if "pip install ." in b]
    tests = [b for b in blocks if "pytest" in b]
    assert len(install) == 1 and len(tests) == 1, blocks
    # apt-get through `$(command -v sudo)`: sudo for a user, nothing for root without sudo.
    assert "apt-get" in install[0]
    assert "sudo apt-get" not in install[0].replace("$(command -v sudo) apt-get", "")
    assert install[0].endswith(".venv/bin/edge-runtime run")
    assert tests[0] == "bash .ci/setup && .venv/bin/python -m pytest"
    setup = (REPO / ".ci/setup").read_text(encoding="utf-8")
    apt_lines = [line for line in setup.splitlines() if re.match(r"\s*[^#\s]*\s*apt-get ", line)]
    assert apt_lines and all("$SUDO apt-get" in line for line in apt_lines), apt_lines
    assert 'SUDO="sudo"' in setup and '"$(id -u)" != "0"' in setup


def test_ci_runs_the_readme_setup_and_test_command() -> None:
    ci = (REPO / ".ci/run").read_text(encoding="utf-8")
    assert "bash .ci/setup" in ci
    assert "PY=.venv/bin/python" in ci
    # The default suite is exactly the README's command; the slow suites follow.
    runs = re.findall(r"^\$PY -m pytest(.*)$", ci, flags=re.M)
    assert runs == ["", " -m slow"], runs
    # Never the machine's own Python: two checkouts on one machine must not repoint each other.
    assert not re.search(r"^\s*python3? -m pip install", ci, flags=re.M)


def test_setup_installs_what_the_tests_would_otherwise_skip_for() -> None:
    setup = (REPO / ".ci/setup").read_text(encoding="utf-8")
    for package in ("mosquitto", "mosquitto-clients", "dcmtk", "dicom3tools", "qemu-user", "python3-venv"):
        assert f"need+=({package})" in setup, package
    assert "npm ci" in setup and "cd cdk" in setup
    assert "-m venv .venv" in setup and "pip install -q -e '.[dev,training,cdk]'" in setup


def test_every_command_line_in_the_manuals_parses() -> None:
    found = [c for manual in MANUALS for c in commands(manual.read_text(encoding="utf-8"))]
    assert len(found) > 20  # the README alone has the quick start, journal, build, training, cloud
    failures = [
        f"{command.line}\n    -> {outcome}\n{err}"
        for command, outcome, err in parse_in_child(found)
        if outcome != "parsed"
    ]
    assert not failures, "\n".join(failures)


def test_every_command_the_manuals_mention_exists() -> None:
    found = [c for manual in MANUALS for c in mentions(manual.read_text(encoding="utf-8"))]
    assert len(found) > 20
    failures = [
        f"`{command.line}` -> {outcome}\n{err}"
        for command, outcome, err in parse_in_child(found, help_only=True)
        if outcome != "parsed"
    ]
    assert not failures, "\n".join(failures)


def test_the_command_finder_sees_what_a_newcomer_types() -> None:
    text = (
        "```bash\n"
        "X=1 .venv/bin/edge-runtime run && edge-runtime sample inbox/   # comment\n"
        "python -m cdk.release trust --group <canary or fleet group> \\\n  --kms-key K\n"
        "python3 -m pip install -e . && python -m pytest\n"
        "```\n"
        "Run `edge-runtime config check -c FILE` or `python -m training COMMAND`."
    )
    lines = [(c.module, c.argv) for c in commands(text)]
    assert lines == [
        ("edge_runtime.cli", ["run"]),
        ("edge_runtime.cli", ["sample", "inbox/"]),
        ("cdk.release", ["trust", "--group", "<canary_or_fleet_group>", "--kms-key", "K"]),
    ]
    assert [(c.module, c.argv) for c in mentions(text)] == [
        ("edge_runtime.cli", ["config", "check", "-c", "x"]),
        ("training", []),
    ]
    # A renamed subcommand is caught.
    report = parse_in_child(commands("```bash\nedge-runtime smaple inbox/\n```\n"))
    assert report[0][1] == "exit 2" and "invalid choice" in report[0][2]


# -- the quick start, run ------------------------------------------------------------------------


def _quick_start_lines() -> tuple[str, str]:
    install, watch = (block.strip() for block in _bash_blocks(_quick_start())[:2])
    return install, watch


def test_the_quick_start_runs_as_written(mosquitto, tmp_path: Path) -> None:
    """The second command, as written, against the service as the first command starts it."""
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto-clients is not installed (apt-get install mosquitto-clients; .ci/setup does)")
    install, watch = _quick_start_lines()
    run = install.rsplit("&& ", 1)[1]  # EDGE_RUNTIME__LOGGING__FORMAT=text .venv/bin/edge-runtime run
    assert run.endswith(".venv/bin/edge-runtime run"), run
    # This checkout's environment stands in for the quick start's fresh .venv, the test broker
    # for the one on localhost:1883; every other word is the README's.
    scripts = sysconfig.get_path("scripts")
    (tmp_path / ".venv").symlink_to(Path(scripts).parent)
    port = str(mosquitto.port)
    env = dict(os.environ, EDGE_RUNTIME__MQTT__PORT=port, EDGE_RUNTIME__MQTT__HOST=mosquitto.host)
    env.pop("EDGE_RUNTIME__MODEL__TRUSTED_KEYS", None)  # the bundled model, as installed: its own key
    env["EDGE_RUNTIME__MQTT__TOPIC_PREFIX"] = "healthdiag/edge"
    service = subprocess.Popen(
        ["bash", "-c", f"exec env {run}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_online(mosquitto.host, port)
        typed = watch.replace("-h localhost", f"-h {mosquitto.host} -p {port}")
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", typed], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        elapsed = time.monotonic() - started
    finally:
        service.send_signal(signal.SIGINT)
        log, _ = service.communicate(timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    decisions = {r["input"]["kind"]: r["decision"]["label"] for r in results}
    assert decisions == {"dicom": "PNEUMONIA", "image": "NORMAL"}, done.stdout
    # "within a few seconds" (the README): the sleep, both files and the DICOM's reports.
    assert elapsed < 30, f"the quick start's results took {elapsed:.1f} s"
    assert not list((tmp_path / "inbox").iterdir()), "the scans stay in the inbox"
    assert service.returncode == 0, log[-3000:]


def _wait_for_online(host: str, port: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = subprocess.run(
            ["mosquitto_sub", "-h", host, "-p", port, "-t", "healthdiag/edge/status", "-C", "1", "-W", "2"],
            capture_output=True,
            text=True,
            check=False,
        )
        if '"online"' in seen.stdout:
            return
        time.sleep(0.5)
    raise TimeoutError("the service did not publish its online status")


def test_the_configuration_reference_is_the_code_s() -> None:
    """docs/configuration.md is ``edge-runtime config reference``: every key of the typed configuration,
    written from it; a setting added, renamed or re-described without regenerating it fails here."""
    from edge_runtime.config_reference import reference_markdown

    expected = reference_markdown()
    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == expected, "regenerate it: edge-runtime config reference > docs/configuration.md"
    from edge_runtime.config import RuntimeConfig

    for section, field in RuntimeConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_fields"):
            for sub in model.model_fields.values():
                assert f"| `{sub.alias}` |" in written or f"`{sub.alias}." in written, (section, sub.alias)


def test_the_readme_is_short_and_links_its_manuals() -> None:
    """A newcomer's page: what it is, the two commands, what a result looks like, where to read on."""
    assert len(README.splitlines()) <= 200
    for manual in (
        "operating",
        "configuration",
        "greengrass",
        "azure-iot-edge",
        "models",
        "cloud",
        "deploying-to-aws",
    ):
        assert f"(docs/{manual}.md)" in README, manual
