"""The typed configuration: validation, unknown keys, environment overrides, CLI check."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.config import RuntimeConfig, load_config
from edge_runtime.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_pascal_case():
    config = load_config(environ={})
    again = RuntimeConfig.from_mapping(config.to_pascal_dict())
    assert again == config
    assert config.mqtt.results_topic == "healthdiag/edge/results"
    assert config.mqtt.qos == 1


def test_file_and_environment_overrides(tmp_path: Path):
    path = tmp_path / "edge.yaml"
    path.write_text("Mqtt:\n  Host: broker.local\n  Port: 1884\nInbox:\n  Path: /data/inbox\n")
    config = load_config(
        path,
        environ={
            "EDGE_RUNTIME__MQTT__PORT": "8883",
            "edge_runtime__inbox__settle_seconds": "2.5",
            "EDGE_RUNTIME__MODEL__BACKEND": "litert",
            "UNRELATED": "x",
        },
    )
    assert config.mqtt.host == "broker.local"
    assert config.mqtt.port == 8883  # environment wins over the file
    assert config.inbox.settle_seconds == 2.5
    assert config.inbox.path == Path("/data/inbox")
    assert config.model.backend == "litert"


def test_every_problem_is_reported_with_its_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "Mqtt:\n  Prot: 1884\n  Port: 70000\n  TopicPrefix: 'a/#'\n"
        "Inbox:\n  SettleSeconds: soon\nModel:\n  Backend: tensorrt\nColour: blue\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert str(path) in text
    for expected in (
        "Mqtt.Prot: unknown setting",
        "Mqtt.Port",
        "Mqtt.TopicPrefix",
        "Inbox.SettleSeconds",
        "Model.Backend",
        "Colour: unknown setting",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_bad_environment_override_names_the_variable():
    with pytest.raises(ConfigError) as info:
        load_config(environ={"EDGE_RUNTIME__MQTT__PORT": "not-a-port"})
    assert "EDGE_RUNTIME__MQTT__PORT" in str(info.value)
    assert "Mqtt.Port" in str(info.value)


def test_config_is_frozen():
    config = load_config(environ={})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        config.mqtt.port = 1  # type: ignore[misc]


def test_cli_config_check(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("EDGE_RUNTIME__MQTT__PORT", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text("Mqtt: {Port: 1999}\n")
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "Port: 1999" in out and "SettleSeconds" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("Mqtt: {Portt: 1999}\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Mqtt.Portt: unknown setting" in err
    missing = tmp_path / "missing.yaml"
    assert main(["config", "check", str(missing)]) == 2
    assert "Cannot read configuration file" in capsys.readouterr().err


def test_empty_strings_mean_unset_as_greengrass_recipes_cannot_hold_null():
    config = RuntimeConfig.from_mapping(
        {
            "Model": {"Threshold": "", "BundlePath": ""},
            "Inbox": {"ProcessedPath": ""},
            "Mqtt": {
                "Username": "",
                "Password": "",
                "PasswordFile": "",
                "Tls": {"CaFile": "", "CertFile": "", "KeyFile": ""},
            },
        }
    )
    assert config.model.threshold is None and config.model.bundle_path is None
    assert config.inbox.processed_path is None and config.mqtt.username is None
    assert config.mqtt.tls.ca_file is None
