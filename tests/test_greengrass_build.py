"""Greengrass components: the build layout, both official recipe schemas, and the project checks.

Neither the nucleus nor greengrass-cli can run here, so these tests pin down everything a local
deployment depends on: file names greengrass-cli matches, recipes both schemas accept, recipe
variables that resolve, a model zip that unpacks to the runtime's Model.BundlePath, a configuration
that is exactly RuntimeConfig's, and a validator that names the recipe and key when any of it breaks.
The build runs with --no-deps-wheels and a tiny bundle, so it stays fast and offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import make_tiny_bundle
from jsonschema import Draft7Validator

from components import validate
from edge_runtime import __version__
from edge_runtime.bundle import BundleTrust, load_bundle
from edge_runtime.config import RuntimeConfig
from edge_runtime.greengrass import resolve_recipe_variables
from edge_runtime.signing import (
    SIGNATURE_NAME,
    bundled_models_key_path,
    load_public_key,
    public_key_fingerprint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD = REPO_ROOT / "components" / "build.py"
SHARED_GREENGRASS = REPO_ROOT.parent / "shared" / "greengrass"
SCHEMA_DIR = SHARED_GREENGRASS / "schemas"
SAMPLE_RECIPES = SHARED_GREENGRASS / "recipes"
RUNTIME = "com.healthdiag.EdgeInference"
MODEL = "com.healthdiag.model.PneumoniaCXR"
#: The runtime component is versioned like the package (pyproject.toml).
RUNTIME_VERSION = __version__
RUNTIME_RECIPE = f"{RUNTIME}-{RUNTIME_VERSION}.yaml"
MODEL_RECIPE = f"{MODEL}-0.1.0.yaml"
BUNDLE_VARIABLE = f"{{{MODEL}:artifacts:decompressedPath}}"


def run_build(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def read_recipe(path: Path) -> dict[str, Any]:
    return validate.load_recipe(path)


def manifest_for(recipe: dict[str, Any], architecture: str) -> dict[str, Any]:
    return next(m for m in recipe["Manifests"] if m["Platform"]["architecture"] == architecture)


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"Greengrass recipe schemas not found at {SCHEMA_DIR} (they live beside the repo)")
    return validate.load_schemas(SCHEMA_DIR)


@pytest.fixture(scope="module")
def tiny_bundle_010(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real bundle at version 0.1.0, so the runtime's dependency range is met."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "pneumonia-cxr", version="0.1.0")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_010: Path) -> Path:
    """One full build (both components) through the real command line, validation included."""
    out = tmp_path_factory.mktemp("gg") / "greengrass-build"
    result = run_build("--out", out, "--no-deps-wheels", "--bundle", tiny_bundle_010)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture()
def build_copy(build_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the build for a test that breaks something on purpose."""
    return Path(shutil.copytree(build_dir, tmp_path / "greengrass-build"))


# --------------------------------------------------------------------------------------------------
# Layout and contents


def test_build_produces_the_greengrass_cli_layout(build_dir: Path) -> None:
    assert sorted(p.name for p in (build_dir / "recipes").iterdir()) == [RUNTIME_RECIPE, MODEL_RECIPE]
    files = sorted(
        p.relative_to(build_dir / "artifacts").as_posix()
        for p in (build_dir / "artifacts").rglob("*")
        if p.is_file()
    )
    assert files == [
        f"{RUNTIME}/{RUNTIME_VERSION}/edge-runtime-wheels.zip",
        f"{MODEL}/0.1.0/pneumonia-cxr.zip",
    ]
    for recipe_file in (build_dir / "recipes").iterdir():
        recipe = read_recipe(recipe_file)
        name, version = recipe["ComponentName"], recipe["ComponentVersion"]
        assert recipe_file.name == f"{name}-{version}.yaml"
        assert {m["Platform"]["architecture"] for m in recipe["Manifests"]} == {"amd64", "aarch64"}
        for manifest in recipe["Manifests"]:
            assert manifest["Platform"]["os"] == "linux"
            for artifact in manifest["Artifacts"]:
                file_name = artifact["Uri"].rsplit("/", 1)[-1]
                assert artifact["Uri"] == f"s3://BUCKET/{name}/{version}/{file_name}"
                assert (build_dir / "artifacts" / name / version / file_name).is_file()
        text = recipe_file.read_text(encoding="utf-8")
        assert not re.search(r"\{(COMPONENT_NAME|COMPONENT_VERSION|BUCKET)\}", text)
        # Quoted, so even plain PyYAML (the GDK) reads the format version as a string.
        assert yaml.safe_load(text)["RecipeFormatVersion"] == "2020-01-25"


def test_runtime_artifact_is_the_project_wheel(build_dir: Path) -> None:
    archive = zipfile.ZipFile(build_dir / "artifacts" / RUNTIME / RUNTIME_VERSION / "edge-runtime-wheels.zip")
    assert archive.namelist() == [
        f"healthdiag_edge-{RUNTIME_VERSION}-py3-none-any.whl"
    ]  # flat: --find-links DIR
    with archive.open(f"healthdiag_edge-{RUNTIME_VERSION}-py3-none-any.whl") as raw:
        wheel = zipfile.ZipFile(raw)
        names = wheel.namelist()
        entry_points = wheel.read(f"healthdiag_edge-{RUNTIME_VERSION}.dist-info/entry_points.txt").decode()
    assert "edge_runtime/config.py" in names
    assert "edge-runtime = edge_runtime.cli:main" in entry_points


def _assert_signature_shipped(bundle_dir: Path) -> None:
    """The runtime refuses a bundle without manifest.sig.json: build.py zips it (issue 14, item 7)."""
    assert (bundle_dir / "manifest.json").is_file()
    assert (bundle_dir / SIGNATURE_NAME).is_file(), "the model zip lacks the manifest's signature"


def test_model_zip_unpacks_to_the_runtime_bundle_path(build_dir: Path, tmp_path: Path) -> None:
    """Greengrass unpacks X.zip into {artifacts:decompressedPath}/X/: that must be a loadable bundle."""
    decompressed = tmp_path / "artifacts-unarchived" / MODEL / "0.1.0"
    zip_path = build_dir / "artifacts" / MODEL / "0.1.0" / "pneumonia-cxr.zip"
    zipfile.ZipFile(zip_path).extractall(decompressed / zip_path.stem)
    runtime = read_recipe(build_dir / "recipes" / RUNTIME_RECIPE)
    bundle_path = runtime["ComponentConfiguration"]["DefaultConfiguration"]["Model"]["BundlePath"]
    assert bundle_path == f"{BUNDLE_VARIABLE}/pneumonia-cxr"
    _assert_signature_shipped(decompressed / zip_path.stem)
    bundle = load_bundle(bundle_path.replace(BUNDLE_VARIABLE, str(decompressed)))
    assert bundle.version == "0.1.0"


def test_zips_are_reproducible(tiny_bundle_010: Path, tmp_path: Path) -> None:
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = run_build("--out", out, "--component", MODEL, "--bundle", tiny_bundle_010, "--no-validate")
        assert result.returncode == 0, result.stderr
        digests.append(
            hashlib.sha256(
                (out / "artifacts" / MODEL / "0.1.0" / "pneumonia-cxr.zip").read_bytes()
            ).hexdigest()
        )
    assert digests[0] == digests[1]


def test_build_refuses_a_tampered_bundle(tiny_bundle_010: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle_010, tmp_path / "bundle"))
    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    result = run_build("--out", tmp_path / "out", "--component", MODEL, "--bundle", bundle)
    assert result.returncode == 1
    assert "failed verification" in result.stderr and "model.onnx" in result.stderr


def test_default_bundle_sets_the_model_version(tmp_path: Path) -> None:
    from edge_runtime.bundle import default_bundle_path

    manifest_path = default_bundle_path() / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip(f"bundled default model not present at {manifest_path.parent}")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    out = tmp_path / "out"
    result = run_build("--out", out, "--component", MODEL, "--no-validate")
    assert result.returncode == 0, result.stderr
    zip_path = out / "artifacts" / MODEL / manifest["version"] / "pneumonia-cxr.zip"
    # The manifest, every file it lists, and the manifest's signature (which it cannot list).
    expected = sorted(["manifest.json", SIGNATURE_NAME, *manifest["files"]])
    assert sorted(zipfile.ZipFile(zip_path).namelist()) == expected
    assert (out / "recipes" / f"{MODEL}-{manifest['version']}.yaml").is_file()


def test_gdk_layout_writes_recipe_yaml(tiny_bundle_010: Path, tmp_path: Path) -> None:
    out = tmp_path / "greengrass-build"
    result = run_build("--out", out, "--component", MODEL, "--gdk-layout", "--bundle", tiny_bundle_010)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in (out / "recipes").iterdir()] == ["recipe.yaml"]
    assert validate.validate_build(out, schemas=None) == []


def test_help_explains_the_options() -> None:
    result = run_build("--help")
    assert result.returncode == 0
    for text in (
        "--no-deps-wheels",
        "--bundle",
        "--version",
        "--platform",
        "manylinux_2_28_aarch64",
        "manylinux2014_aarch64",
    ):
        assert text in result.stdout


def test_build_and_validate_run_as_modules() -> None:
    """``python -m components.build`` / ``components.validate`` from the repository root."""
    for module in ("components.build", "components.validate"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: python -m {module}" in result.stdout


def test_version_skew_is_reported() -> None:
    """A foreign --platform can make pip pick old releases; the build must say so."""
    import onnxruntime

    from components import build

    old = "onnxruntime-1.16.3-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
    current = f"onnxruntime-{onnxruntime.__version__}-cp311-cp311-manylinux_2_28_aarch64.whl"
    assert build.version_skew([old]) == [
        f"shipping onnxruntime 1.16.3, but {onnxruntime.__version__} is installed here (and tested)"
    ]
    assert build.version_skew([current, "not-a-wheel.tar.gz"]) == []


# --------------------------------------------------------------------------------------------------
# The recipes' contract


def test_generated_recipes_pass_both_official_schemas(
    build_dir: Path, schemas: dict[str, dict[str, Any]]
) -> None:
    for recipe_file in sorted((build_dir / "recipes").iterdir()):
        recipe = read_recipe(recipe_file)
        for label, schema in schemas.items():
            assert validate.schema_problems(recipe, schema, recipe_name=recipe_file.name, label=label) == []


def test_generated_build_passes_the_project_checks(build_dir: Path) -> None:
    assert [str(p) for p in validate.validate_build(build_dir, schemas=None)] == []
    assert validate.main([str(build_dir)]) == 0


def test_default_configuration_is_runtime_config(build_dir: Path) -> None:
    """Same nested PascalCase keys as RuntimeConfig (less the Azure IoT Edge section), values it accepts."""
    recipe = read_recipe(build_dir / "recipes" / RUNTIME_RECIPE)
    config = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    settings = {k: v for k, v in config.items() if k != "accessControl"}

    def keys(tree: Any) -> Any:
        return {k: keys(v) for k, v in tree.items()} if isinstance(tree, dict) else None

    expected = RuntimeConfig().to_pascal_dict()
    assert set(validate.OTHER_HOST_SECTIONS) <= set(expected)
    for section in validate.OTHER_HOST_SECTIONS:
        del expected[section]
    assert keys(settings) == keys(expected)
    loaded = RuntimeConfig.from_mapping(settings)
    assert loaded.model.threshold is None  # "" = the bundle's own operating point
    assert str(loaded.inbox.path).startswith("/var/lib/healthdiag/")
    assert str(loaded.journal.path).startswith("/var/lib/healthdiag/")


def test_runtime_recipe_dependency_and_least_privilege(build_dir: Path) -> None:
    recipe = read_recipe(build_dir / "recipes" / RUNTIME_RECIPE)
    dependency = recipe["ComponentDependencies"][MODEL]
    assert dependency["DependencyType"] == "HARD"
    # This runtime reads 0.1.x, 0.2.x (conformance set), 0.3.x (heat-map output) and 0.4.x bundles
    # (features output, OOD check, age range, drift reference), not 0.5.
    for version in ("0.1.0", "0.2.0", "0.3.0", "0.4.0"):
        assert validate.satisfies(version, dependency["VersionRequirement"])
    assert not validate.satisfies("0.5.0", dependency["VersionRequirement"])
    access = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    grants = {
        (service, op, res)
        for service, policies in access.items()
        for policy in policies.values()
        for op in policy["operations"]
        for res in policy["resources"]
    }
    assert grants == {
        ("aws.greengrass.ipc.pubsub", "aws.greengrass#PublishToTopic", "healthdiag/edge/*"),
        ("aws.greengrass.ipc.mqttproxy", "aws.greengrass#PublishToIoTCore", "healthdiag/edge/*"),
    }


def test_runtime_lifecycle(build_dir: Path) -> None:
    recipe = read_recipe(build_dir / "recipes" / RUNTIME_RECIPE)
    amd64, arm64 = manifest_for(recipe, "amd64"), manifest_for(recipe, "aarch64")
    # One lifecycle for both CPUs (duplicated in YAML, so it must not drift).
    assert amd64["Lifecycle"] == arm64["Lifecycle"] and amd64["Artifacts"] == arm64["Artifacts"]
    lifecycle = amd64["Lifecycle"]
    install, run, recover = lifecycle["Install"], lifecycle["Run"], lifecycle["Recover"]
    assert install["RequiresPrivilege"] is True and int(install["Timeout"]) >= 900
    assert "python3 -m venv '{work:path}/venv'" in install["Script"]
    assert (
        "pip' install --no-index" in install["Script"]
        and "--find-links '{artifacts:decompressedPath}/edge-runtime-wheels' healthdiag-edge"
        in install["Script"]
    )
    assert run["RequiresPrivilege"] is False
    assert "exec '{work:path}/venv/bin/edge-runtime' run" in run["Script"]
    assert recover["RequiresPrivilege"] is False
    for step in (install, run, recover):  # POSIX sh must at least parse every script
        subprocess.run(["sh", "-n", "-c", step["Script"]], check=True)


def _interpolate(text: str, values: dict[str, str]) -> str:
    """What the nucleus does to lifecycle text: replace the variables it knows, leave the rest."""
    return re.sub(r"\{([^{}\s]+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _as_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


@pytest.mark.parametrize(
    "interpolate_configuration", [True, False], ids=["interpolateComponentConfiguration", "plain-nucleus"]
)
def test_run_script_hands_the_configuration_to_the_runtime(
    build_dir: Path, tmp_path: Path, interpolate_configuration: bool
) -> None:
    """Simulate the nucleus: unpack the model, interpolate Setenv and Run, run it with a fake runtime.

    The environment it hands over must load as the recipe's configuration and point at the bundle,
    with or without interpolateComponentConfiguration on the nucleus.
    """
    decompressed = tmp_path / "unarchived" / MODEL / "0.1.0"
    zipfile.ZipFile(build_dir / "artifacts" / MODEL / "0.1.0" / "pneumonia-cxr.zip").extractall(
        decompressed / "pneumonia-cxr"
    )
    work = tmp_path / "work"
    (work / "venv" / "bin").mkdir(parents=True)
    dump = tmp_path / "env.json"
    fake = work / "venv" / "bin" / "edge-runtime"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n"
        "assert sys.argv[1:] == ['run']\n"
    )
    fake.chmod(0o755)

    recipe = read_recipe(build_dir / "recipes" / RUNTIME_RECIPE)
    config = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    device = {
        "work:path": str(work),
        "iot:thingName": "xray-room-1",
        f"{MODEL}:artifacts:decompressedPath": str(decompressed),
    }
    if interpolate_configuration:
        config = json.loads(_interpolate(json.dumps(config), device))
    values = dict(device)
    for path, value in _leaves(config, ""):
        values[f"configuration:{path}"] = _as_text(value)
    lifecycle = manifest_for(recipe, "amd64")["Lifecycle"]
    env = {"PATH": os.environ["PATH"], "AWS_IOT_THING_NAME": "xray-room-1"}  # set by the nucleus
    env.update({k: _interpolate(str(v), values) for k, v in lifecycle["Setenv"].items()})
    subprocess.run(
        ["sh", "-c", _interpolate(lifecycle["Run"]["Script"], values)], env=env, check=True, timeout=60
    )

    handed_over = json.loads(dump.read_text(encoding="utf-8"))
    # The runtime gets its configuration over IPC (GetConfiguration: DefaultConfiguration,
    # interpolated or not) and resolves what the nucleus left with the environment it got.
    from_ipc = {k: v for k, v in config.items() if k != "accessControl"}
    loaded = RuntimeConfig.from_mapping(resolve_recipe_variables(from_ipc, handed_over))
    assert loaded.model.bundle_path == decompressed / "pneumonia-cxr"
    assert loaded.mqtt.client_id == "edge-runtime-xray-room-1"
    assert loaded.model.threshold is None
    assert loaded.inbox.path == Path("/var/lib/healthdiag/inbox")
    assert loaded.mqtt.tls.enabled is False and loaded.decode.isolate is True
    # The recipe's Model.TrustedKeys (inline PEM) are the project's bundled-models key.
    recipe_trust = BundleTrust.from_config(loaded.model)
    assert recipe_trust.require_signature
    assert recipe_trust.fingerprints == [public_key_fingerprint(load_public_key(bundled_models_key_path()))]
    _assert_signature_shipped(loaded.model.bundle_path)
    load_bundle(loaded.model.bundle_path)  # (a tiny bundle signed with the session's test key)


def _leaves(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}/{key}")]
    return [(prefix, tree)]


# --------------------------------------------------------------------------------------------------
# The validator catches what breaks a deployment, naming the recipe and the key


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _runtime(build: Path) -> Path:
    return build / "recipes" / RUNTIME_RECIPE


def _model(build: Path) -> Path:
    return build / "recipes" / MODEL_RECIPE


BREAKAGES: dict[str, tuple[Callable[[Path], None], str, str, list[str]]] = {
    # name: (break the build, recipe reported, check, texts the message must contain)
    "bad-configuration-pointer": (
        lambda b: _edit(_runtime(b), "{configuration:/Health/File}", "{configuration:/Health/Files}"),
        RUNTIME_RECIPE,
        "variable",
        ["/Health/Files", "no key 'Files'", "did you mean /Health/File"],
    ),
    "missing-artifact": (
        lambda b: (b / "artifacts" / MODEL / "0.1.0" / "pneumonia-cxr.zip").unlink(),
        MODEL_RECIPE,
        "artifact",
        ["pneumonia-cxr.zip", f"artifacts/{MODEL}/0.1.0/pneumonia-cxr.zip"],
    ),
    "unsatisfiable-dependency": (
        lambda b: _edit(_runtime(b), '">=0.1.0 <0.5.0"', '"^0.2.0"'),
        RUNTIME_RECIPE,
        "dependency",
        [MODEL, "'^0.2.0'", "this build has", "0.1.0"],
    ),
    "extra-config-key": (
        lambda b: _edit(_runtime(b), "      Host: localhost\n", "      Host: localhost\n      Hostname: x\n"),
        RUNTIME_RECIPE,
        "config",
        ["unknown key Mqtt.Hostname", "RuntimeConfig has no such setting", "did you mean Mqtt.Host?"],
    ),
    "missing-config-key": (
        lambda b: _edit(_runtime(b), "      Qos: 1\n", ""),
        RUNTIME_RECIPE,
        "config",
        ["missing key Mqtt.Qos"],
    ),
    "invalid-config-value": (
        lambda b: _edit(_runtime(b), "      Qos: 1\n", "      Qos: 3\n"),
        RUNTIME_RECIPE,
        "config",
        ["the runtime would refuse", "Mqtt.Qos", "(got 3)"],
    ),
    "not-a-direct-dependency": (
        lambda b: _edit(
            _runtime(b),
            f'"{BUNDLE_VARIABLE}/pneumonia-cxr"',
            '"{aws.greengrass.Nucleus:artifacts:decompressedPath}/pneumonia-cxr"',
        ),
        RUNTIME_RECIPE,
        "variable",
        ["aws.greengrass.Nucleus", "not a direct dependency"],
    ),
    "unfilled-placeholder": (
        lambda b: _edit(
            _runtime(b),
            "exec '{work:path}/venv/bin/edge-runtime' run",
            "exec '{work:path}/venv/bin/edge-runtime' run --tag {COMPONENT_VERSION}",
        ),
        RUNTIME_RECIPE,
        "variable",
        ["{COMPONENT_VERSION}", "build placeholder"],
    ),
    "setenv-from-wrong-key": (
        lambda b: _edit(
            _runtime(b),
            "EDGE_RUNTIME_MODEL_DIR: ",
            'EDGE_RUNTIME__MQTT__PORT: "{configuration:/Mqtt/Host}"\n        X: ',
        ),
        RUNTIME_RECIPE,
        "setenv",
        ["EDGE_RUNTIME__MQTT__PORT", "Mqtt.Port", "/Mqtt/Host"],
    ),
    "setenv-unknown-setting": (
        lambda b: _edit(_runtime(b), "EDGE_RUNTIME_MODEL_DIR:", "EDGE_RUNTIME__WORKER_COUNT:"),
        RUNTIME_RECIPE,
        "setenv",
        ["EDGE_RUNTIME__WORKER_COUNT", "does not name a RuntimeConfig setting"],
    ),
    "null-value": (
        lambda b: _edit(_runtime(b), '      Threshold: ""\n', "      Threshold: null\n"),
        RUNTIME_RECIPE,
        "recipe",
        ["ComponentConfiguration.DefaultConfiguration.Model.Threshold", "null"],
    ),
    "unquoted-format-version": (
        lambda b: _edit(_model(b), 'RecipeFormatVersion: "2020-01-25"', "RecipeFormatVersion: 2020-01-25"),
        MODEL_RECIPE,
        "recipe",
        ["RecipeFormatVersion", "unquoted date"],
    ),
    "wildcard-grant": (
        lambda b: _edit(_runtime(b), '- "aws.greengrass#PublishToIoTCore"', '- "*"'),
        RUNTIME_RECIPE,
        "access",
        ["mqttproxy", "every IPC operation"],
    ),
    "topic-not-granted": (
        lambda b: _edit(_runtime(b), "LocalFhirTopic: healthdiag/edge/fhir", "LocalFhirTopic: hospital/fhir"),
        RUNTIME_RECIPE,
        "access",
        ["Greengrass.LocalFhirTopic", "hospital/fhir", "PublishToTopic"],
    ),
    "stale-artifact": (
        lambda b: (b / "artifacts" / RUNTIME / RUNTIME_VERSION / "old.whl").write_bytes(b""),
        RUNTIME_RECIPE,
        "artifact",
        ["old.whl", "not referenced"],
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validator_reports_breakage(build_copy: Path, breakage: str) -> None:
    do, recipe_file, check, texts = BREAKAGES[breakage]
    do(build_copy)
    problems = validate.validate_build(build_copy, schemas=None)
    matching = [p for p in problems if p.recipe == recipe_file and p.check == check]
    assert matching, f"no {check} problem for {recipe_file}; got: {[str(p) for p in problems]}"
    assert any(all(t in str(p) for t in texts) for p in matching), [str(p) for p in matching]
    assert validate.main([str(build_copy)]) == 1


def test_validator_reports_an_artifact_folder_without_recipe(build_copy: Path) -> None:
    (build_copy / "artifacts" / MODEL / "0.0.9").mkdir()
    problems = validate.validate_build(build_copy, schemas=None)
    assert [(p.check, p.where) for p in problems] == [("layout", f"artifacts/{MODEL}/0.0.9")]


def test_validator_cli_without_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate.main([str(tmp_path / "nowhere")]) == 1
    assert "run components/build.py first" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Versions and npm-style requirements, as Greengrass resolves dependencies


@pytest.mark.parametrize(
    ("version", "requirement", "expected"),
    [
        ("0.1.0", ">=0.1.0 <0.2.0", True),
        ("0.1.9", ">=0.1.0 <0.2.0", True),
        ("0.2.0", ">=0.1.0 <0.2.0", False),
        ("0.0.9", ">=0.1.0 <0.2.0", False),
        ("0.1.5", "^0.1.0", True),
        ("0.2.0", "^0.1.0", False),
        ("1.9.0", "^1.1", True),
        ("2.0.0", "^1.1", False),
        ("0.0.3", "^0.0.3", True),
        ("0.0.4", "^0.0.3", False),
        ("0.1.7", "~0.1.0", True),
        ("0.2.0", "~0.1.0", False),
        ("1.4.0", "~1", True),
        ("0.1.0", "0.1.0", True),
        ("0.1.1", "0.1.0", False),
        ("0.1.1", "=0.1.1", True),
        ("0.1.4", "0.1.x", True),
        ("0.2.0", "0.1.*", False),
        ("3.0.0", "*", True),
        ("1.5.0", "1.2.3 - 1.4", False),
        ("1.4.9", "1.2.3 - 1.4", True),
        ("2.0.0", "^1.0.0 || ^2.0.0", True),
        ("1.0.1", ">1.0.0", True),
        ("1.0.0", ">1.0.0", False),
        ("1.1.0", ">= 1.0.0 < 1.1.0", False),
        ("1.2.0", "<=1.2", True),
        ("1.3.0", "<=1.2", False),
        ("0.2.0-beta.1", ">=0.1.0", False),  # pre-releases only match a range that names one
        ("0.2.0-beta.2", ">=0.2.0-beta.1 <0.3.0", True),
        ("0.2.0-beta.1", "<0.2.0", False),
    ],
)
def test_satisfies(version: str, requirement: str, expected: bool) -> None:
    assert validate.satisfies(version, requirement) is expected


@pytest.mark.parametrize("bad", ["0.1", "1.2.3.4", "v", "01.2.3"])
def test_parse_version_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a semantic version"):
        validate.parse_version(bad)


@pytest.mark.parametrize("bad", [">=banana", "1.x.3", "^"])
def test_parse_requirement_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate.parse_requirement(bad)


# --------------------------------------------------------------------------------------------------
# The official sample recipes through the schema validator


def _sample(name: str) -> Path:
    path = SAMPLE_RECIPES / name
    if not path.is_file():
        pytest.skip(f"sample recipe {name} not found in {SAMPLE_RECIPES} (it lives beside the repo)")
    return path


@pytest.mark.parametrize(
    "name",
    [
        "cc_sample-recipe-with-all-fields.yaml",
        "cc_sample-recipe-with-all-fields.json",
        "cc_b2-recipe-with-all-fields.json",
        "tflite_runtime_recipe.json",
        "tflite_ic_modelstore_recipe.json",
        "tflite_ic_recipe.json",
    ],
)
def test_valid_samples_pass_both_schemas(name: str, schemas: dict[str, dict[str, Any]]) -> None:
    recipe = validate.load_recipe(_sample(name))
    for label, schema in schemas.items():
        assert validate.schema_problems(recipe, schema, recipe_name=name, label=label) == []


def test_missing_uri_fails_both_schemas(schemas: dict[str, dict[str, Any]]) -> None:
    name = "cc_sample-recipe-fail-missing-uri.yaml"
    recipe = validate.load_recipe(_sample(name))
    for label, schema in schemas.items():
        problems = validate.schema_problems(recipe, schema, recipe_name=name, label=label)
        assert [(p.where, p.message) for p in problems] == [
            ("Manifests[0].Artifacts[0]", "'uri' is a required property")
        ]


def test_illegal_component_name_fails_both_schemas(schemas: dict[str, dict[str, Any]]) -> None:
    name = "cc_sample-recipe-with-illegal-component-name.yaml"
    recipe = validate.load_recipe(_sample(name))
    for label, schema in schemas.items():
        problems = validate.schema_problems(recipe, schema, recipe_name=name, label=label)
        by_where = {p.where: p.message for p in problems}
        assert "does not match '^[a-zA-Z0-9-_.]+$'" in by_where["ComponentName"]
        # The sample also has no Manifests, which both schemas require.
        assert by_where[""] == "'manifests' is a required property"


def test_sample_with_broken_uri_passes_schemas_but_not_project_checks(tmp_path: Path) -> None:
    """'s3//some-bucket/...' is a string to the schemas; the artifact check refuses it."""
    recipe = validate.load_recipe(_sample("cc_sample-recipe-with-all-fields.json"))
    problems = validate.project_problems(tmp_path, [("sample.json", recipe)], config_keys=None)
    assert any(
        p.check == "artifact"
        and "'s3//some-bucket/hello-world2.py' is not an s3://BUCKET/KEY URI" in p.message
        for p in problems
    )


def test_schemas_need_lower_case_keys_and_string_versions(schemas: dict[str, dict[str, Any]]) -> None:
    """Why the validator lower-cases keys for BOTH schemas and never lets YAML make dates."""
    raw = yaml.safe_load(_sample("cc_sample-recipe-with-all-fields.yaml").read_text(encoding="utf-8"))
    messages = {e.message for e in Draft7Validator(schemas["common"]).iter_errors(raw)}
    assert "'recipeformatversion' is a required property" in messages  # keys as written: not recognised
    lowered = validate.lower_keys(raw)  # plain safe_load: RecipeFormatVersion became a date
    messages = {e.message for e in Draft7Validator(schemas["common"]).iter_errors(lowered)}
    assert any("is not of type 'string'" in m for m in messages)
    assert (
        validate.load_recipe(_sample("cc_sample-recipe-with-all-fields.yaml"))["RecipeFormatVersion"]
        == "2020-01-25"
    )


# --------------------------------------------------------------------------------------------------
# GDK project files


@pytest.mark.parametrize("name", [RUNTIME, MODEL])
def test_gdk_config(name: str) -> None:
    folder = REPO_ROOT / "components" / name
    config = json.loads((folder / "gdk-config.json").read_text(encoding="utf-8"))
    schema_path = SCHEMA_DIR / "gdk_config_schema.json"
    if schema_path.is_file():
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
        assert [e.message for e in Draft7Validator(schema).iter_errors(config)] == []
    component = config["component"][name]
    build = component["build"]
    assert build["build_system"] == "custom"
    command = build["custom_build_command"]
    assert (folder / command[1]).resolve() == BUILD
    assert command[command.index("--component") + 1] == name and "--gdk-layout" in command
    # GDK needs recipe.yaml in the project folder: a link to the one template.
    assert (folder / "recipe.yaml").resolve() == (REPO_ROOT / "recipes" / f"{name}.yaml").resolve()
    # The GDK version must be what the build produces by default.
    if name == RUNTIME:
        import tomllib

        pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        assert component["version"] == pyproject["project"]["version"]
    else:
        from edge_runtime.bundle import default_bundle_path

        manifest = default_bundle_path() / "manifest.json"
        if manifest.is_file():
            assert component["version"] == json.loads(manifest.read_text(encoding="utf-8"))["version"]
