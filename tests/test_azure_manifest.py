"""The Azure IoT Edge deployment manifests (``python -m components.azure``), as IoT Hub would get them.

* The real command, once, in a subprocess: both manifests written, valid against the official
  IoT Edge schemas (``../shared/azure/schemas``, draft-04, read in place; skipped when absent).
* The runtime twin's desired properties are the Greengrass recipe's defaults except for the
  documented differences, and the runtime accepts them.
* What the schemas miss: createOptions chunks (<= 512 characters, <= 8), twin limits, routes between
  modules that exist, and the FHIR output never routed to ``$upstream``, however the route is spelt.
* ``--dicom``, ``--mqtt-host`` and ``--local-consumer`` change exactly what they say.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft4Validator

from components import validate
from components.azure import __main__ as cli
from components.azure.checks import check_deployment, check_layered, default_schema_dir, load_schemas
from components.azure.limits import create_options_problems, create_options_settings, twin_problems
from components.azure.manifest import MODEL_MODULE, RUNTIME_MODULE, ManifestOptions, build_manifests
from components.azure.problems import ManifestError
from components.azure.routes import UPSTREAM, route
from edge_runtime.config import RuntimeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "edge_runtime" / "models" / "pneumonia-cxr"
RECIPE = REPO_ROOT / "recipes" / "com.healthdiag.EdgeInference.yaml"
CONSUMER = "HospitalBridge"


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    folder = default_schema_dir()
    try:
        return load_schemas(folder)
    except FileNotFoundError as exc:
        pytest.skip(f"IoT Edge schemas not found ({exc}): they are test data beside the repository")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The real command line, run once with its defaults."""
    out = tmp_path_factory.mktemp("azure")
    result = subprocess.run(
        [sys.executable, "-m", "components.azure", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, out


def bundle_version() -> str:
    return json.loads((BUNDLE / "manifest.json").read_text(encoding="utf-8"))["version"]


def content(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["modulesContent"]


def desired(manifest: dict[str, Any]) -> dict[str, Any]:
    return content(manifest)[RUNTIME_MODULE]["properties.desired"]


def routes(manifest: dict[str, Any]) -> dict[str, str]:
    hub = content(manifest)["$edgeHub"]["properties.desired"]
    return {name: value["route"] for name, value in hub["routes"].items()}


def create_options(module: dict[str, Any]) -> dict[str, Any]:
    settings = module["settings"]
    keys = sorted(k for k in settings if k.startswith("createOptions"))
    return json.loads("".join(settings[k] for k in keys))


def module(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return content(manifest)["$edgeAgent"]["properties.desired"]["modules"][name]


# --------------------------------------------------------------------------------------------------
# The command and the schemas


def test_the_command_writes_both_manifests(written: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, out = written
    assert result.returncode == 0, result.stdout + result.stderr
    layered = f"model-{bundle_version()}.layered.json"
    assert sorted(p.name for p in out.iterdir()) == ["deployment.json", layered]
    assert "OK" in result.stdout and "7 days" in result.stdout


def test_the_deployment_is_valid_against_the_official_schemas(
    written: tuple[subprocess.CompletedProcess[str], Path], schemas: dict[str, dict[str, Any]]
) -> None:
    manifest = json.loads((written[1] / "deployment.json").read_text(encoding="utf-8"))
    for schema in schemas.values():
        Draft4Validator.check_schema(schema)
    agent, hub = content(manifest)["$edgeAgent"], content(manifest)["$edgeHub"]
    for instance, label in (
        (manifest, "deployment"),
        ({"$edgeAgent": agent}, "edgeAgent"),
        ({"$edgeHub": hub}, "edgeHub"),
    ):
        errors = [e.message for e in Draft4Validator(schemas[label]).iter_errors(instance)]
        assert errors == [], label
    assert agent["properties.desired"]["schemaVersion"] == "1.1"
    assert hub["properties.desired"]["schemaVersion"] == "1.2"


def test_no_schema_takes_a_layered_deployment_whole_but_its_module_is_a_valid_module(
    written: tuple[subprocess.CompletedProcess[str], Path], schemas: dict[str, dict[str, Any]]
) -> None:
    """Why check_layered checks pieces: twin paths (properties.desired.modules.X) are no schema's keys."""
    layered = json.loads((written[1] / f"model-{bundle_version()}.layered.json").read_text(encoding="utf-8"))
    assert not Draft4Validator(schemas["deployment"]).is_valid(layered)
    assert not Draft4Validator(schemas["edgeAgent"]).is_valid({"$edgeAgent": content(layered)["$edgeAgent"]})
    agent = schemas["edgeAgent"]
    definition = agent["properties"]["$edgeAgent"]["properties"]["properties.desired"]["properties"][
        "modules"
    ]
    (one_module,) = definition["patternProperties"].values()
    standalone = {**one_module, "definitions": agent["definitions"]}
    piece = content(layered)["$edgeAgent"][f"properties.desired.modules.{MODEL_MODULE}"]
    assert list(Draft4Validator(standalone).iter_errors(piece)) == []


@pytest.mark.parametrize(
    "options",
    [
        ManifestOptions(),
        ManifestOptions(dicom=True, mqtt_host="broker.hospital.local"),
        ManifestOptions(local_consumer=CONSUMER, local_consumer_image="myacr.azurecr.io/bridge:1.2.0"),
        ManifestOptions(registry="myacr.azurecr.io", host_data="/data/healthdiag", local_consumer=CONSUMER),
    ],
    ids=["defaults", "dicom-mqtt", "consumer-deployed", "consumer-elsewhere"],
)
def test_every_variant_passes_every_check(
    options: ManifestOptions, schemas: dict[str, dict[str, Any]]
) -> None:
    manifests = build_manifests(options)
    problems = check_deployment(
        manifests.deployment, schemas=schemas, external_modules=manifests.external_modules
    )
    problems += check_layered(
        manifests.layered, manifests.deployment, schemas=schemas, external_modules=manifests.external_modules
    )
    assert [str(p) for p in problems] == []


def test_the_command_writes_nothing_when_a_check_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.azure.problems import Problem

    monkeypatch.setattr(
        cli, "check_deployment", lambda *a, **k: [Problem("deployment.json", "x", "broken", "twin")]
    )
    assert cli.main(["--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
    assert "deployment.json: x: broken [twin]" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--out", str(tmp_path), "--bundle", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path), "--local-consumer", RUNTIME_MODULE]) == 2
    assert cli.main(["--out", str(tmp_path), "--host-data", "srv/healthdiag"]) == 2
    assert "absolute host path" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path), "--schemas", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_print_images_names_the_tags_to_build(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-images", "--registry", "myacr.azurecr.io"]) == 0
    version = validate.parse_version(bundle_version())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("RUNTIME_IMAGE=myacr.azurecr.io/healthdiag/edge-runtime:")
    assert lines[1] == f"MODEL_IMAGE=myacr.azurecr.io/healthdiag/model-pneumonia-cxr:{version}"


# --------------------------------------------------------------------------------------------------
# Modules and desired properties


def test_images_and_modules() -> None:
    manifest = build_manifests(ManifestOptions()).deployment
    agent = content(manifest)["$edgeAgent"]["properties.desired"]
    system = agent["systemModules"]
    assert system["edgeAgent"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-agent:1.5"
    assert system["edgeHub"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-hub:1.5"
    hub_ports = create_options(system["edgeHub"])["HostConfig"]["PortBindings"]
    assert sorted(hub_ports) == ["443/tcp", "5671/tcp", "8883/tcp"]
    runtime, model = module(manifest, RUNTIME_MODULE), module(manifest, MODEL_MODULE)
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert runtime["settings"]["image"] == f"healthdiag.azurecr.io/healthdiag/edge-runtime:{version}"
    assert (
        model["settings"]["image"]
        == f"healthdiag.azurecr.io/healthdiag/model-pneumonia-cxr:{bundle_version()}"
    )
    assert model["startupOrder"] < runtime["startupOrder"]
    for each in (runtime, model):
        assert (each["status"], each["restartPolicy"]) == ("running", "always")
    binds = create_options(runtime)["HostConfig"]["Binds"]
    assert binds == ["healthdiag-models:/models:ro", "/srv/healthdiag:/var/lib/healthdiag"]
    assert create_options(model)["HostConfig"]["Binds"] == ["healthdiag-models:/models"]
    credentials = agent["runtime"]["settings"]["registryCredentials"]
    (entry,) = credentials.values()
    assert entry == {
        "username": "$CONTAINER_REGISTRY_USERNAME",
        "password": "$CONTAINER_REGISTRY_PASSWORD",
        "address": "healthdiag.azurecr.io",
    }
    store = content(manifest)["$edgeHub"]["properties.desired"]["storeAndForwardConfiguration"]
    assert store["timeToLiveSecs"] >= 3 * 24 * 3600


def test_desired_properties_are_the_recipe_defaults_but_for_the_documented_differences() -> None:
    recipe = validate.load_recipe_text(RECIPE.read_text(encoding="utf-8"))
    expected = copy.deepcopy(recipe["ComponentConfiguration"]["DefaultConfiguration"])
    del expected["accessControl"], expected["Greengrass"]
    expected["Azure"] = {**RuntimeConfig().to_pascal_dict()["Azure"], "FhirOutput": ""}
    expected["Model"]["BundlePath"] = f"/models/pneumonia-cxr-{bundle_version()}"
    expected["Mqtt"]["Enabled"] = False
    expected["Mqtt"]["ClientId"] = "edge-runtime-{deviceId}"
    assert desired(build_manifests(ManifestOptions()).deployment) == expected


def test_the_runtime_accepts_its_desired_properties() -> None:
    twin = copy.deepcopy(desired(build_manifests(ManifestOptions(dicom=True)).deployment))
    twin["Mqtt"]["ClientId"] = twin["Mqtt"]["ClientId"].replace("{deviceId}", "site-7-box-2")
    config = RuntimeConfig.from_mapping(twin)
    assert config.mqtt.client_id == "edge-runtime-site-7-box-2"
    assert str(config.model.bundle_path) == f"/models/pneumonia-cxr-{bundle_version()}"
    assert config.dicom.enabled and not config.mqtt.enabled


def test_dicom_turns_the_receiver_on_and_publishes_its_port() -> None:
    off, on = (build_manifests(ManifestOptions(dicom=flag)).deployment for flag in (False, True))
    assert desired(off)["Dicom"]["Enabled"] is False and desired(on)["Dicom"]["Enabled"] is True
    assert "PortBindings" not in create_options(module(off, RUNTIME_MODULE))["HostConfig"]
    options = create_options(module(on, RUNTIME_MODULE))
    assert options["HostConfig"]["PortBindings"] == {"11112/tcp": [{"HostPort": "11112"}]}
    assert options["ExposedPorts"] == {"11112/tcp": {}}


def test_mqtt_host_turns_the_local_broker_on() -> None:
    mqtt = desired(build_manifests(ManifestOptions(mqtt_host="broker.local")).deployment)["Mqtt"]
    assert (mqtt["Enabled"], mqtt["Host"]) == (True, "broker.local")


# --------------------------------------------------------------------------------------------------
# Routes


def test_results_and_urgent_go_to_iot_hub_and_fhir_is_off_without_a_local_consumer() -> None:
    manifest = build_manifests(ManifestOptions()).deployment
    prefix = f"FROM /messages/modules/{RUNTIME_MODULE}/outputs"
    assert routes(manifest) == {
        "urgentToIoTHub": f"{prefix}/urgent INTO $upstream",
        "resultsToIoTHub": f"{prefix}/results INTO $upstream",
    }
    assert desired(manifest)["Azure"]["FhirOutput"] == ""


def test_a_local_consumer_gets_results_urgent_and_fhir_on_inputs_of_the_same_names() -> None:
    manifests = build_manifests(ManifestOptions(local_consumer=CONSUMER))
    local = {k: v for k, v in routes(manifests.deployment).items() if UPSTREAM not in v}
    assert local == {
        f"{name}To{CONSUMER}": f"FROM /messages/modules/{RUNTIME_MODULE}/outputs/{name} "
        f'INTO BrokeredEndpoint("/modules/{CONSUMER}/inputs/{name}")'
        for name in ("urgent", "results", "fhir")
    }
    assert desired(manifests.deployment)["Azure"]["FhirOutput"] == "fhir"
    assert manifests.external_modules == (CONSUMER,)
    problems = check_deployment(manifests.deployment, schemas=None)
    assert {p.check for p in problems} == {"route"} and all(CONSUMER in p.message for p in problems)
    deployed = build_manifests(
        ManifestOptions(local_consumer=CONSUMER, local_consumer_image="r.io/bridge:1.0")
    )
    assert module(deployed.deployment, CONSUMER)["settings"]["image"] == "r.io/bridge:1.0"
    assert deployed.external_modules == ()


def test_the_fhir_output_is_never_made_into_a_route_to_upstream() -> None:
    with pytest.raises(ManifestError, match="FHIR"):
        route(RUNTIME_MODULE, "fhir", UPSTREAM, fhir_output="fhir", priority=1)
    with pytest.raises(ManifestError, match="FHIR"):
        route(RUNTIME_MODULE, "phi", UPSTREAM, fhir_output="phi", priority=1)


@pytest.mark.parametrize(
    "spelling",
    [
        f"FROM /messages/modules/{RUNTIME_MODULE}/outputs/fhir INTO $upstream",
        f"FROM /messages/modules/{RUNTIME_MODULE}/outputs/* INTO $upstream",
        f"FROM /messages/modules/{RUNTIME_MODULE}/* INTO $upstream",
        "FROM /messages/* WHERE $connectionModuleId = 'x' INTO $upstream",
        "FROM /* INTO $upstream",
    ],
)
def test_no_spelling_of_a_fhir_route_to_upstream_passes_the_checks(spelling: str) -> None:
    """Hand edits included, and even while the twin has the FHIR output off (it is one edit away)."""
    for options in (ManifestOptions(), ManifestOptions(local_consumer=CONSUMER)):
        manifests = build_manifests(options)
        manifest = copy.deepcopy(manifests.deployment)
        content(manifest)["$edgeHub"]["properties.desired"]["routes"]["everything"] = spelling
        problems = check_deployment(manifest, schemas=None, external_modules=manifests.external_modules)
        assert [p.where for p in problems if "FHIR" in p.message] == ["$edgeHub.routes.everything"]


def test_routes_must_join_modules_and_outputs_that_exist() -> None:
    manifest = build_manifests(ManifestOptions()).deployment
    hub_routes = content(manifest)["$edgeHub"]["properties.desired"]["routes"]
    del hub_routes["resultsToIoTHub"]
    hub_routes["ghost"] = f"FROM /messages/modules/{RUNTIME_MODULE}/outputs/nothing INTO $upstream"
    source = f"FROM /messages/modules/{RUNTIME_MODULE}/outputs"
    hub_routes["nobody"] = f'{source}/urgent INTO BrokeredEndpoint("/modules/Nobody/inputs/x")'
    hub_routes["stranger"] = "FROM /messages/modules/Stranger/outputs/x INTO $upstream"
    hub_routes["garbled"] = "SEND everything SOMEWHERE"
    messages = {p.where.rsplit(".", 1)[-1]: p.message for p in check_deployment(manifest, schemas=None)}
    assert "no output 'nothing'" in messages["ghost"]
    assert "'Nobody', which is not deployed" in messages["nobody"]
    assert "'Stranger', which is not deployed" in messages["stranger"]
    assert "cannot read route" in messages["garbled"]
    assert "output 'results': edgeHub would drop" in messages["routes"]


# --------------------------------------------------------------------------------------------------
# createOptions and twin limits


def test_create_options_are_split_into_512_character_chunks() -> None:
    options = {"HostConfig": {"Binds": [f"/srv/site/folder-{i:03d}:/data/folder-{i:03d}" for i in range(40)]}}
    settings = create_options_settings(options, "Big")
    text = json.dumps(options, separators=(",", ":"), sort_keys=True)
    assert 1024 < len(text) <= 4096
    assert list(settings) == ["createOptions", *(f"createOptions{i:02d}" for i in range(1, len(settings)))]
    assert all(len(chunk) <= 512 for chunk in settings.values())
    assert json.loads("".join(settings.values())) == options
    assert create_options_problems(settings, "Big.settings", "m") == []


def test_create_options_over_eight_chunks_are_refused_naming_the_module() -> None:
    options = {"Env": [f"SETTING_{i:04d}=" + "x" * 40 for i in range(90)]}
    with pytest.raises(ManifestError, match=r"^Huge: createOptions is \d+ characters.*at most 8 chunks"):
        create_options_settings(options, "Huge")


def test_create_options_chunks_that_edgeagent_would_refuse_are_problems() -> None:
    text = json.dumps({"HostConfig": {"Binds": ["/a:/b"] * 100}})
    gappy = {"image": "x:1", "createOptions": text[:512], "createOptions02": text[512:]}
    long = {"image": "x:1", "createOptions": text}
    assert any("expected" in p.message for p in create_options_problems(gappy, "m", "f"))
    assert any("at most 512" in p.message for p in create_options_problems(long, "m", "f"))
    nine = {f"createOptions{i:02d}" if i else "createOptions": "{}" for i in range(9)}
    assert any("at most 8" in p.message for p in create_options_problems(nine, "m", "f"))


def test_every_generated_create_options_fits(schemas: dict[str, dict[str, Any]]) -> None:
    manifest = build_manifests(ManifestOptions(dicom=True, local_consumer=CONSUMER)).deployment
    agent = content(manifest)["$edgeAgent"]["properties.desired"]
    for each in [*agent["systemModules"].values(), *agent["modules"].values()]:
        chunks = [v for k, v in each["settings"].items() if k.startswith("createOptions")]
        assert chunks and all(isinstance(c, str) and len(c) <= 512 for c in chunks)
        assert isinstance(create_options(each), dict)


def test_twin_limits_are_problems() -> None:
    assert [p.check for p in twin_problems({"Good": {"Key": [1, "a"]}}, "t", "m")] == []
    bad_keys = twin_problems({"Mqtt.Host": 1, "$x": 2, "a b": 3, "Null": None}, "t", "m")
    assert len(bad_keys) == 4
    big = {f"Key{i}": "x" * 4000 for i in range(9)}
    assert any("32" in p.message or "limit" in p.message for p in twin_problems(big, "t", "m"))
    assert any("4096" in p.message for p in twin_problems({"Pem": "x" * 5000}, "t", "m"))
    deep: dict[str, Any] = {"v": 1}
    for _ in range(11):
        deep = {"d": deep}
    assert any("deeper" in p.message for p in twin_problems(deep, "t", "m"))


# --------------------------------------------------------------------------------------------------
# The layered model roll-out


def test_the_layered_manifest_rolls_out_the_model_and_points_the_runtime_at_it() -> None:
    manifests = build_manifests(ManifestOptions())
    layered = content(manifests.layered)
    assert sorted(layered) == ["$edgeAgent", RUNTIME_MODULE]
    piece = layered["$edgeAgent"][f"properties.desired.modules.{MODEL_MODULE}"]
    assert piece == module(manifests.deployment, MODEL_MODULE)
    path = layered[RUNTIME_MODULE]["properties.desired.Model.BundlePath"]
    assert path == f"/models/pneumonia-cxr-{bundle_version()}"


def test_a_layered_manifest_whose_model_and_path_disagree_is_refused() -> None:
    manifests = build_manifests(ManifestOptions())
    layered = copy.deepcopy(manifests.layered)
    piece = content(layered)["$edgeAgent"][f"properties.desired.modules.{MODEL_MODULE}"]
    piece["settings"]["image"] = piece["settings"]["image"].rsplit(":", 1)[0] + ":9.9.9"
    problems = check_layered(layered, manifests.deployment, schemas=None)
    assert [p.check for p in problems] == ["layered"] and "9.9.9" in problems[0].message
    content(layered)[RUNTIME_MODULE]["properties.desired.Model.BundlePath"] = "/tmp/model"
    assert any(p.check == "config" for p in check_layered(layered, manifests.deployment, schemas=None))


def test_a_layer_cannot_add_a_fhir_route_to_upstream() -> None:
    manifests = build_manifests(
        ManifestOptions(local_consumer=CONSUMER, local_consumer_image="r.io/bridge:1.0")
    )
    layered = copy.deepcopy(manifests.layered)
    content(layered)["$edgeHub"] = {"properties.desired.routes.leak": "FROM /messages/* INTO $upstream"}
    problems = check_layered(layered, manifests.deployment, schemas=None)
    assert [(p.where, p.check) for p in problems] == [("$edgeHub.routes.leak", "route")]
    assert "FHIR" in problems[0].message
