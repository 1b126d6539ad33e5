"""The training command line: every stage has a command, and ``pipeline`` runs from a config file."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from training.cli import build_parser, parse_args

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "training" / "configs" / "kermany-efficientnet-lite0.toml"


def test_every_stage_has_a_command_with_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("prepare", "train", "export", "quantize", "ood", "evaluate", "package", "pipeline"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"python -m training {command}" in text
        assert "--out" in text or "--data" in text


def test_pipeline_reads_its_options_from_toml_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'out = "runs/from-file"\naug-views = 2\nlabel_smoothing = 0.05\ntrain-bn = true\naugment = "mild"\n',
        encoding="utf-8",
    )
    args = parse_args(["pipeline", "--config", str(config), "--aug-views", "4"])
    assert args.out == Path("runs/from-file")  # converted by the option's own type
    assert args.aug_views == 4  # the command line wins over the file
    assert args.label_smoothing == 0.05  # underscores work as well as dashes
    assert args.train_bn is True
    assert args.augment == "mild"
    assert args.seed == 2018  # untouched options keep their defaults


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown option 'bogus'"),
        ('epochs = "many"\n', "epochs = 'many'"),
        ('augment = "wild"\n', "augment must be one of"),
        ("train-bn = 1\n", "train-bn must be true or false"),
        ("epochs = \n", "not valid TOML"),
    ],
)
def test_pipeline_config_errors_name_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["pipeline", "--config", str(config)])
    assert message in str(exit_info.value)
    assert str(config) in str(exit_info.value)


def test_the_shipped_config_parses() -> None:
    args = parse_args(["pipeline", "--config", str(SHIPPED_CONFIG)])
    assert args.model == "efficientnet-lite0"
    assert args.min_sensitivity == 0.95


def test_ood_before_quantize_says_what_to_run(tmp_path: Path) -> None:
    from training.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ood", "--out", str(tmp_path)])
    assert "run 'python -m training export" in str(info.value.code)


def test_quantize_before_export_says_what_to_run(tmp_path: Path) -> None:
    from training.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--out", str(tmp_path)])
    assert "python -m training export --out" in str(exit_info.value)


def test_keygen_writes_a_private_key_only_its_owner_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_runtime.signing import load_private_key, load_public_key, public_key_fingerprint
    from training.cli import main

    assert main(["keygen", str(tmp_path / "keys"), "--name", "site"]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "keys" / "site.pem", tmp_path / "keys" / "site.pub.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    fingerprint = public_key_fingerprint(load_public_key(public))
    assert f"fingerprint: {fingerprint}" in out
    assert public_key_fingerprint(load_private_key(private).public_key()) == fingerprint
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        main(["keygen", str(tmp_path / "keys"), "--name", "site"])
