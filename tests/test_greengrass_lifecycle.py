"""The whole Greengrass lifecycle with real parts: build, deploy, install, run, update, stop.

What the nucleus would do on a core device, done here step by step:

1. ``components/build.py`` builds both components, dependency wheels included (pip fetches them
   from the configured index), and validates the build.
2. The artifacts are laid out as the nucleus lays them out under its root:
   ``packages/artifacts/<Name>/<Version>/`` (``{artifacts:path}``, files with the recipe's
   ``Permission``), ``packages/artifacts-unarchived/<Name>/<Version>/X/`` for each
   ``Unarchive: ZIP`` artifact ``X.zip`` (``{artifacts:decompressedPath}``), and ``work/<Name>/``
   (``{work:path}``).
3. The runtime recipe's lifecycle for this CPU is interpolated as the nucleus'
   ``KernelConfigResolver`` does (same placeholder patterns, JSON pointers into the component
   configuration, cross-component variables only for direct dependencies, unknown ones left as
   they are), and its Install script runs with ``sh -c``: a venv, installed offline from the
   shipped wheels alone.
4. A :class:`~ggipc.FakeNucleus` holds the component configuration (the recipe's
   DefaultConfiguration, not interpolated: the default ``interpolateComponentConfiguration: false``,
   so the runtime resolves the recipe variables itself), and the Run script runs as a child
   process with the environment a nucleus gives it.
5. Real chest X-rays go into the inbox; results arrive on a real Mosquitto and on Greengrass
   local pub/sub, from the model component's unpacked bundle.
6. A config-only deployment changes the threshold live; 7. SIGTERM stops the service cleanly.

The one deliberate deviation from a device: every ``/var/lib/healthdiag`` path, in the lifecycle
scripts and in the configuration, is moved to a temp folder, because a test must not write to
``/var/lib``. Also, as on a device without pip configuration, the Install step runs with
``PIP_CONFIG_FILE=/dev/null`` so that only the shipped wheels can satisfy it (this machine's pip
configuration adds extra wheel folders). Scripts run as the current user instead of
``root``/``ggc_user``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ggipc import FakeNucleus
from helpers import Subscriber, published_name

from edge_runtime.results import load_schema

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD = REPO_ROOT / "components" / "build.py"
RUNTIME = "com.healthdiag.EdgeInference"
MODEL = "com.healthdiag.model.PneumoniaCXR"
THING = "xray-room-lifecycle"
VAR_LIB = "/var/lib/healthdiag"
SIIM = "dicom/siim_torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
KERMANY = "cxr/kermany_pneumonia_224/test/NORMAL"
ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "aarch64", "arm64": "aarch64"}
RESULT_VALIDATOR = jsonschema.Draft202012Validator(load_schema("result-v1"))
# pip output that means "no network", not "no such wheel".
NETWORK_ERRORS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Name or service not known",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
    "No route to host",
    "Could not fetch URL",
)


# --------------------------------------------------------------------------------------------------
# What the nucleus does


# aws-greengrass-nucleus KernelConfigResolver: {namespace:key} and {component:namespace:key}.
SAME_COMPONENT = re.compile(r"\{([.\w]+):([^:}]+)\}", re.ASCII)
CROSS_COMPONENT = re.compile(r"\{([.\w]+):([.\w]+):([^:}]+)\}", re.ASCII)


def _json_pointer(tree: Any, pointer: str) -> Any:
    """RFC 6901 lookup; ``KeyError`` when the pointer names nothing."""
    if pointer == "":
        return tree
    if not pointer.startswith("/"):
        raise KeyError(pointer)
    node = tree
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise KeyError(pointer)
    return node


def _configuration_text(configuration: dict[str, Any], pointer: str) -> str | None:
    """Jackson's view of a value: asText() for a leaf, compact sorted JSON for a container."""
    try:
        value = _json_pointer(configuration, pointer)
    except KeyError:
        return None  # the nucleus logs an error and leaves the placeholder
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class Nucleus:
    """The interpolation and file layout of a Greengrass nucleus rooted at ``root``."""

    def __init__(self, root: Path, thing_name: str) -> None:
        self.root = root
        self.thing_name = thing_name
        self.versions: dict[str, str] = {}
        self.configurations: dict[str, dict[str, Any]] = {}

    def artifacts_path(self, name: str) -> Path:
        return self.root / "packages" / "artifacts" / name / self.versions[name]

    def decompressed_path(self, name: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / name / self.versions[name]

    def work_path(self, name: str) -> Path:
        return self.root / "work" / name

    def deploy_artifacts(self, name: str, version: str, manifest: dict[str, Any], source: Path) -> None:
        """Copy each artifact, unpack ``Unarchive: ZIP`` ones, set permissions, create the work folder."""
        self.versions[name] = version
        target = self.artifacts_path(name)
        target.mkdir(parents=True)
        for artifact in manifest.get("Artifacts", []):
            file_name = artifact["Uri"].rsplit("/", 1)[-1]
            copied = Path(shutil.copy2(source / file_name, target / file_name))
            mode = _artifact_mode(artifact.get("Permission", {}))
            copied.chmod(mode)
            if str(artifact.get("Unarchive", "NONE")).upper() == "ZIP":
                unpacked = self.decompressed_path(name) / copied.name.rsplit(".", 1)[0]
                with zipfile.ZipFile(copied) as archive:
                    archive.extractall(unpacked)
                _set_tree_mode(unpacked, mode)
        self.work_path(name).mkdir(parents=True, exist_ok=True)

    def _system(self, name: str, namespace: str, key: str) -> str | None:
        if name not in self.versions:
            return None
        values = {
            ("artifacts", "path"): self.artifacts_path,
            ("artifacts", "decompressedPath"): self.decompressed_path,
            ("work", "path"): self.work_path,
        }
        if (namespace, key) in values:
            return str(values[(namespace, key)](name).absolute())
        if (namespace, key) == ("kernel", "rootPath"):
            return str(self.root.absolute())
        if (namespace, key) == ("iot", "thingName"):
            return self.thing_name
        return None

    def _lookup(self, component: str, namespace: str, key: str) -> str | None:
        if namespace == "configuration":
            return _configuration_text(self.configurations.get(component, {}), key)
        return self._system(component, namespace, key)

    def interpolate(self, text: str, component: str, dependencies: set[str]) -> str:
        """Replace what the nucleus would replace in a lifecycle string; leave the rest."""
        for match in SAME_COMPONENT.finditer(text):
            value = self._lookup(component, match.group(1), match.group(2))
            if value is not None:
                text = text.replace(match.group(0), value)
        for match in CROSS_COMPONENT.finditer(text):
            target, namespace, key = match.groups()
            if target not in dependencies:  # only direct dependencies
                continue
            value = self._lookup(target, namespace, key)
            if value is not None:
                text = text.replace(match.group(0), value)
        return text

    def interpolate_lifecycle(self, lifecycle: Any, component: str, dependencies: set[str]) -> Any:
        if isinstance(lifecycle, str):
            return self.interpolate(lifecycle, component, dependencies)
        if isinstance(lifecycle, dict):
            return {k: self.interpolate_lifecycle(v, component, dependencies) for k, v in lifecycle.items()}
        return lifecycle


def _artifact_mode(permission: dict[str, Any]) -> int:
    """Recipe ``Permission`` -> file mode (Read/Execute: NONE, OWNER or ALL)."""
    mode = 0
    for what, owner_bit, all_bits in (("Read", stat.S_IRUSR, 0o444), ("Execute", stat.S_IXUSR, 0o111)):
        level = str(permission.get(what, "OWNER" if what == "Read" else "NONE")).upper()
        mode |= all_bits if level == "ALL" else owner_bit if level == "OWNER" else 0
    return mode


def _set_tree_mode(path: Path, file_mode: int) -> None:
    """Unpacked artifacts: folders rwxr-xr-x, files as the artifact's Permission says."""
    path.chmod(0o755)
    for child in path.rglob("*"):
        child.chmod(0o755 if child.is_dir() else file_mode)


# --------------------------------------------------------------------------------------------------
# Helpers


def _package_index_unreachable(pip_output: str) -> bool:
    """Did pip fail for lack of network (not for a missing wheel)? Ask the index for numpy."""
    if any(marker in pip_output for marker in NETWORK_ERRORS):
        return True
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "numpy"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return probe.returncode != 0


def _retarget(tree: Any, old: str, new: str) -> Any:
    """Every string value starting with ``old`` (a folder) moved under ``new``."""
    if isinstance(tree, dict):
        return {k: _retarget(v, old, new) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_retarget(v, old, new) for v in tree]
    if isinstance(tree, str) and (tree == old or tree.startswith(old + "/")):
        return new + tree[len(old) :]
    return tree


def _wheel_key(name: str, version: str) -> tuple[str, str]:
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _installed_distributions(venv: Path) -> set[tuple[str, str]]:
    found = set()
    for info in venv.glob("lib/python3*/site-packages/*.dist-info"):
        name, version = info.name[: -len(".dist-info")].rsplit("-", 1)
        found.add(_wheel_key(name, version))
    return found


def _granted(resource_patterns: list[str], topic: str) -> bool:
    """Greengrass authorization: ``*`` in a resource matches any characters."""
    return any(re.fullmatch(".*".join(map(re.escape, p.split("*"))), topic) for p in resource_patterns)


def _drop(source: Path, inbox: Path, name: str) -> None:
    """What a DICOM receiver does: write NAME.part, then rename it into place."""
    part = inbox / f"{name}.part"
    part.write_bytes(source.read_bytes())
    part.rename(inbox / name)


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no component log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait(
    condition: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> Any:
    """Poll ``condition`` until truthy; fail early, with the component log, if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(
                f"the Run process exited with {proc.returncode} while waiting for {what}; "
                f"component log:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f} s waiting for {what}; component log:\n{_log_tail(log)}"
            )
        time.sleep(0.1)


def _mqtt_result(sub: Subscriber, source: Path, name: str, key_file: Path) -> dict[str, Any] | None:
    """The result for ``source`` dropped as ``name`` (results name scans by a keyed reference)."""
    published = published_name(source, name, key_file=key_file)
    return next((r for r in sub.results() if r["input"].get("file_name") == published), None)


def _ipc_result(nucleus: FakeNucleus, message_id: str) -> dict[str, Any] | None:
    """The result's PublishToTopic on the results topic (urgent results repeat it on their own topic)."""
    for call in nucleus.calls_for("PublishToTopic"):
        if call["topic"] != "healthdiag/edge/results":
            continue
        message = (call.get("publishMessage") or {}).get("jsonMessage", {}).get("message")
        if isinstance(message, dict) and message.get("message_id") == message_id:
            return call
    return None


class _OpenedFiles:
    """Files opened under a folder (inotify IN_OPEN, via watchdog), to see which bundle was loaded."""

    def __init__(self, folder: Path) -> None:
        from watchdog.events import FileOpenedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.paths: set[str] = set()
        lock = threading.Lock()
        paths = self.paths

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if isinstance(event, FileOpenedEvent):
                    with lock:
                        paths.add(os.fsdecode(event.src_path))

        self.observer = Observer()
        self.observer.schedule(Handler(), str(folder), recursive=True)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# The test


def test_build_install_run_update_stop_like_the_nucleus(
    shared_data: Path, mosquitto: Any, tmp_path: Path
) -> None:
    from components import validate

    architecture = ARCHITECTURES.get(platform.machine().lower())
    if architecture is None:
        pytest.skip(f"the recipes have no manifest for this CPU ({platform.machine()})")
    assert not re.search(r"[\s'\"\\$`]", str(tmp_path)), f"temp path unusable in sh scripts: {tmp_path}"
    timings: dict[str, float] = {}

    # 1. Build both components, dependency wheels included (what a release ships).
    build_dir = tmp_path / "greengrass-build"
    started = time.monotonic()
    built = subprocess.run(
        [sys.executable, str(BUILD), "--out", str(build_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    timings["build"] = time.monotonic() - started
    output = built.stdout + built.stderr
    if (
        built.returncode != 0
        and "Downloading the dependency wheels failed" in output
        and _package_index_unreachable(output)
    ):
        pytest.skip(
            "components/build.py could not download the dependency wheels: no network or "
            f"package index here ({output.strip().splitlines()[-1]})"
        )
    assert built.returncode == 0, f"components/build.py failed:\n{output}"

    recipes = {}
    for recipe_file in sorted((build_dir / "recipes").glob("*.yaml")):
        recipe = validate.load_recipe(recipe_file)
        recipes[recipe["ComponentName"]] = recipe
    assert sorted(recipes) == sorted([RUNTIME, MODEL])

    def manifest(name: str) -> dict[str, Any]:
        return next(
            m
            for m in recipes[name]["Manifests"]
            if m["Platform"].get("os") == "linux" and m["Platform"].get("architecture") == architecture
        )

    # 2. Deploy: lay the artifacts out as the nucleus does (dependency first).
    gg = Nucleus(tmp_path / "greengrass" / "v2", THING)
    for name in (MODEL, RUNTIME):
        version = recipes[name]["ComponentVersion"]
        gg.deploy_artifacts(name, version, manifest(name), build_dir / "artifacts" / name / version)
    wheels_dir = gg.decompressed_path(RUNTIME) / "edge-runtime-wheels"
    bundle_dir = gg.decompressed_path(MODEL) / "pneumonia-cxr"
    assert (bundle_dir / "manifest.json").is_file(), sorted(gg.decompressed_path(MODEL).rglob("*"))
    bundle_manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    shipped = {_wheel_key(*w.name.split("-")[:2]) for w in wheels_dir.glob("*.whl")}
    assert len(shipped) > 1, f"the runtime artifact holds no dependency wheels: {sorted(shipped)}"

    # The configuration the nucleus holds: DefaultConfiguration, /var/lib/healthdiag moved to a temp
    # folder (the deviation), the real test broker, a short heartbeat. Not interpolated (the
    # nucleus' default), so Model.BundlePath and Mqtt.ClientId still hold recipe variables.
    data_root = tmp_path / "var-lib-healthdiag"
    default_configuration = recipes[RUNTIME]["ComponentConfiguration"]["DefaultConfiguration"]
    configuration = _retarget(copy.deepcopy(default_configuration), VAR_LIB, str(data_root))
    assert VAR_LIB not in json.dumps(configuration)
    configuration["Mqtt"].update(Host=mosquitto.host, Port=mosquitto.port)
    configuration["Health"]["HeartbeatSeconds"] = 1.0
    key_file = Path(configuration["Journal"]["Path"]).parent / "reference.key"  # made by the service
    gg.configurations[RUNTIME] = configuration
    gg.configurations[MODEL] = (
        recipes[MODEL].get("ComponentConfiguration", {}).get("DefaultConfiguration", {})
    )

    # 3. Interpolate the lifecycle (after moving /var/lib/healthdiag in the script text).
    raw_lifecycle = manifest(RUNTIME)["Lifecycle"]
    assert VAR_LIB in raw_lifecycle["Install"]["Script"]
    moved = json.loads(json.dumps(raw_lifecycle).replace(VAR_LIB, str(data_root)))
    dependencies = set(recipes[RUNTIME].get("ComponentDependencies", {}))
    lifecycle = gg.interpolate_lifecycle(moved, RUNTIME, dependencies)
    scripts = {step: lifecycle[step]["Script"] for step in ("Install", "Run", "Recover")}
    for step, script in scripts.items():
        assert VAR_LIB not in script, step
        assert not SAME_COMPONENT.search(script) and not CROSS_COMPONENT.search(script), (
            f"{step} script keeps a recipe variable the nucleus cannot resolve:\n{script}"
        )
    setenv = {k: str(v) for k, v in lifecycle.get("Setenv", {}).items()}
    assert setenv["EDGE_RUNTIME_MODEL_DIR"] == str(bundle_dir.absolute())

    nucleus = FakeNucleus(component_name=RUNTIME, configuration=configuration, thing_name=THING).start()
    nucleus.add_component(MODEL, gg.configurations[MODEL])
    base_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL") if k in os.environ}
    env = {**base_env, **nucleus.env(), **setenv}
    proc: subprocess.Popen[bytes] | None = None
    subscriber: Subscriber | None = None
    opened: _OpenedFiles | None = None
    log = tmp_path / f"{RUNTIME}.log"
    try:
        # Install: a venv, offline, from the shipped wheels alone.
        started = time.monotonic()
        install = subprocess.run(
            ["sh", "-c", scripts["Install"]],
            env={**env, "PIP_CONFIG_FILE": os.devnull},
            cwd=gg.work_path(RUNTIME),
            capture_output=True,
            text=True,
            timeout=int(lifecycle["Install"].get("Timeout", 120)),
            check=False,
        )
        timings["install"] = time.monotonic() - started
        assert install.returncode == 0, (
            f"Install failed ({install.returncode}):\n{install.stdout[-4000:]}\n{install.stderr[-4000:]}"
        )
        venv = gg.work_path(RUNTIME) / "venv"
        executable = venv / "bin" / "edge-runtime"
        assert executable.is_file() and os.access(executable, os.X_OK)
        assert data_root.is_dir()
        installed = {k for k in _installed_distributions(venv) if k[0] not in ("pip", "setuptools")}
        assert installed - shipped == set(), "installed from outside the artifact"
        assert any(name == "healthdiag_edge" for name, _ in installed)

        # 4. Run, as the nucleus starts it, with the configuration served over IPC.
        subscriber = Subscriber(mosquitto, f"{configuration['Mqtt']['TopicPrefix']}/#")
        opened = _OpenedFiles(bundle_dir)
        started = time.monotonic()
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                ["sh", "-c", scripts["Run"]],
                env=env,
                cwd=gg.work_path(RUNTIME),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _wait(lambda: "RUNNING" in nucleus.states(), 120, "UpdateState RUNNING", proc, log)
        timings["running"] = time.monotonic() - started
        assert nucleus.states() == ["RUNNING"]
        assert nucleus.calls_for("GetConfiguration"), "the configuration was not read over IPC"
        assert nucleus.subscriber_count("SubscribeToConfigurationUpdate") == 1
        # The model component's unpacked bundle was loaded (the wheel ships a copy of the default).
        _wait(
            lambda: str(bundle_dir / "manifest.json") in opened.paths, 10, "the bundle being read", proc, log
        )

        # 5. Real X-rays into the inbox, as a DICOM receiver writes them.
        inbox = Path(configuration["Inbox"]["Path"])
        assert inbox.is_relative_to(data_root)
        _wait(inbox.is_dir, 10, "the inbox folder", proc, log)
        run_id = uuid.uuid4().hex[:8]
        first = {
            f"lifecycle-{run_id}-siim.dcm": shared_data / SIIM,
            f"lifecycle-{run_id}-kermany.jpeg": shared_data / KERMANY / "IM-0001-0001.jpeg",
        }
        dropped = time.monotonic()
        for name, source in first.items():
            _drop(source, inbox, name)
        threshold = float(bundle_manifest["operating_point"]["threshold"])
        pubsub_policies = configuration["accessControl"]["aws.greengrass.ipc.pubsub"].values()
        local_grants = [
            r
            for policy in pubsub_policies
            for r in policy["resources"]
            if "aws.greengrass#PublishToTopic" in policy["operations"]
        ]
        for name in first:
            result = _wait(
                lambda n=name: _mqtt_result(subscriber, first[n], n, key_file),
                120,
                f"the MQTT result for {name}",
                proc,
                log,
            )
            timings.setdefault("first result", time.monotonic() - dropped)
            RESULT_VALIDATOR.validate(result)
            model_file = bundle_manifest["artifacts"][0]["file"]
            assert (result["model"]["name"], result["model"]["version"], result["model"]["sha256"]) == (
                "pneumonia-cxr",
                bundle_manifest["version"],
                bundle_manifest["files"][model_file],
            )
            assert result["findings"][0]["threshold"] == pytest.approx(threshold)
            call = _wait(
                lambda r=result: _ipc_result(nucleus, r["message_id"]),
                30,
                f"PublishToTopic for {name}",
                proc,
                log,
            )
            assert call["topic"] == configuration["Greengrass"]["LocalTopic"]
            assert _granted(local_grants, call["topic"]), "published outside the accessControl grant"
            assert call["publishMessage"]["jsonMessage"]["message"] == result
        siim = _mqtt_result(subscriber, shared_data / SIIM, next(iter(first)), key_file)
        assert siim["input"]["kind"] == "dicom" and siim["input"]["sop_instance_uid"].startswith("1.2.276")
        # Greengrass.IotCoreTopic is "" by default: no result goes to AWS IoT Core, only the box's
        # retained health report on <StatusTopic>/<thing name> and its drift report on
        # <Drift.IotCoreTopic>/<thing name> (no scan identifier in either).
        to_cloud = {call["topicName"] for call in nucleus.calls_for("PublishToIoTCore")}
        assert to_cloud <= {
            f"healthdiag/edge/status/{nucleus.thing_name}",
            f"healthdiag/edge/drift/{nucleus.thing_name}",
        }, to_cloud

        # 6. A config-only deployment: threshold 0.0, applied live by the same process.
        pid, connects = proc.pid, len(nucleus.connect_messages)
        nucleus.set_configuration(RUNTIME, ["Model", "Threshold"], 0.0)
        _wait(
            lambda: "configuration updated live" in log.read_text(encoding="utf-8", errors="replace"),
            30,
            "the live configuration update",
            proc,
            log,
        )
        name = f"lifecycle-{run_id}-after-update.jpeg"
        source = shared_data / KERMANY / "IM-0003-0001.jpeg"
        _drop(source, inbox, name)
        after = _wait(
            lambda: _mqtt_result(subscriber, source, name, key_file),
            120,
            f"the MQTT result for {name}",
            proc,
            log,
        )
        assert after["findings"][0]["threshold"] == 0.0 and after["decision"]["positive"] is True
        _wait(lambda: _ipc_result(nucleus, after["message_id"]), 30, f"PublishToTopic for {name}", proc, log)
        assert proc.poll() is None and proc.pid == pid, "the process restarted"
        assert len(nucleus.connect_messages) == connects and nucleus.states() == ["RUNNING"]

        # 7. Stop as the nucleus does: SIGTERM (the Run script exec'd the runtime: it gets it).
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the runtime did not stop within 60 s of SIGTERM:\n{_log_tail(log)}")
        timings["stop"] = time.monotonic() - started
        assert code == 0, f"the Run process exited with {code} after SIGTERM:\n{_log_tail(log)}"
        # The nucleus waits 5 s after SIGTERM (Exec.gracefulShutdownTimeout), then SIGKILLs.
        assert timings["stop"] < 5.0, f"an idle runtime took {timings['stop']:.1f} s to stop"
        client_id = f"edge-runtime-{THING}"  # Mqtt.ClientId, {iot:thingName} resolved by the runtime
        subscriber.wait_for(
            lambda payloads: any(
                p.get("message_type") == "status"
                and p.get("client_id") == client_id
                and p.get("state") == "offline"
                and p.get("reason") == "service stopped"
                for p in payloads
            ),
            timeout_s=10,
        )
        health = json.loads(Path(configuration["Health"]["File"]).read_text(encoding="utf-8"))
        assert health["state"] == "offline" and health["counters"]["processed"] == 3
        nucleus.wait_until(lambda: nucleus.connection_count == 0, timeout=10)
        assert "ERRORED" not in nucleus.states()

        # The Recover script (run by the nucleus after a failed Run) reads the interpolated health file.
        recover = subprocess.run(
            ["sh", "-c", scripts["Recover"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=int(lifecycle["Recover"].get("Timeout", 60)),
            check=False,
        )
        assert recover.returncode == 0 and '"state": "offline"' in recover.stderr, recover.stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if opened is not None:
            opened.stop()
        if subscriber is not None:
            subscriber.close()
        nucleus.stop()
        print("\ngreengrass lifecycle timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
