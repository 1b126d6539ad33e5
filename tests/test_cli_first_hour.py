"""What a new user hit in their first hour with ``edge-runtime`` (issue 22), run as real processes.

Each command is run the way the admin runs it (a subprocess of the console
entry point), on real files, real journals and real model bundles. A box
without LiteRT (a plain ``pip install .``) is reproduced with an import
blocker in the child process: ``ai_edge_litert`` and ``tflite_runtime`` fail
to import there exactly as they do where they are not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers import make_tiny_bundle

from edge_runtime.journal import Delivery, Journal, check_journal, id_path_for

REPO_ROOT = Path(__file__).resolve().parents[1]
LITERT_MODULES = "ai_edge_litert,tflite_runtime"

#: ``python -c BLOCKER MODULES ARGS...``: the CLI with MODULES (comma-separated) not importable.
BLOCKER = """
import sys
from importlib.abc import MetaPathFinder


class NotInstalled(MetaPathFinder):
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled(set(sys.argv[1].split(","))))
from edge_runtime.cli import main

sys.exit(main(sys.argv[2:]))
"""


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, without: str = ""
) -> subprocess.CompletedProcess[str]:
    """``edge-runtime ARGS`` in a child process; ``without``: modules that cannot be imported there."""
    command = (
        [sys.executable, "-c", BLOCKER, without, *args]
        if without
        else [sys.executable, "-m", "edge_runtime.cli", *args]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def assert_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


# -- 1. process: a missing file or a folder -------------------------------------------------
@pytest.fixture
def process_env(tmp_path: Path) -> dict[str, str]:
    # With a reference set, so that stderr holds only the files' errors (no warning about its absence).
    bundle = make_tiny_bundle(tmp_path / "tiny-bundle", conformance=True)
    return dict(
        os.environ,
        EDGE_RUNTIME__MODEL__BUNDLE_PATH=str(bundle),
        EDGE_RUNTIME__JOURNAL__PATH=str(tmp_path / "state" / "journal.sqlite3"),
    )


def _grey_png(path: Path, level: int) -> Path:
    cv2.imwrite(str(path), np.full((128, 96), level, dtype=np.uint8))
    return path


def test_process_reports_each_missing_file_and_folder_as_one_error_and_goes_on(
    process_env: dict[str, str], tmp_path: Path
) -> None:
    dark = _grey_png(tmp_path / "dark.png", 20)
    bright = _grey_png(tmp_path / "bright.png", 230)
    folder = tmp_path / "scans"
    folder.mkdir()
    done = run_cli(
        "process",
        "/no/such.dcm",
        str(dark),
        str(folder),
        "typo.png",
        str(bright),
        cwd=tmp_path,
        env=process_env,
    )
    assert done.returncode == 1
    assert_no_traceback(done)
    # The readable files were still analysed, in order: the tiny model calls bright images PNEUMONIA.
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 2
    assert [r["decision"]["label"] for r in results] == ["NORMAL", "PNEUMONIA"], results
    # One JSON error per failed file, in the same shape as any other file that fails.
    errors = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["file"] for e in errors] == ["/no/such.dcm", str(folder), "typo.png"]
    assert all(set(e) == {"file", "code", "error", "action"} for e in errors)
    missing, is_folder, typo = errors
    assert missing["code"] == "file_not_found"
    assert missing["error"] == "/no/such.dcm does not exist; it was not analysed."
    assert "Check the file name and folder" in missing["action"]
    assert is_folder["code"] == "not_a_regular_file"
    assert is_folder["error"] == f"{folder} is a folder, not a file; nothing in it was analysed."
    assert f"edge-runtime process {folder}/*" in is_folder["action"]
    # A relative name says where it was looked for.
    assert typo["code"] == "file_not_found" and f"(looked for {tmp_path / 'typo.png'})" in typo["error"]


def test_process_refuses_a_named_pipe_instead_of_waiting_for_ever(
    process_env: dict[str, str], tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    done = run_cli("process", str(fifo), env=process_env)  # would block in open() if it were read
    assert done.returncode == 1 and done.stdout == ""
    assert_no_traceback(done)
    (error,) = [json.loads(line) for line in done.stderr.splitlines()]
    assert error["code"] == "not_a_regular_file" and "not a regular file" in error["error"]


def test_process_help_says_what_happens_to_files_that_cannot_be_analysed() -> None:
    out = run_cli("process", "--help").stdout
    assert "missing, a folder" in out and "the others are still analysed" in out and "Exit status 1" in out


# -- 2. config check: -c/--config, unset values, a missing file -------------------------------
def test_config_check_takes_c_and_config_like_every_other_command(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("Mqtt: {Port: 1999}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME__MQTT__")}
    positional = run_cli("config", "check", str(config), env=env)
    assert positional.returncode == 0, positional.stderr
    assert "Port: 1999" in positional.stdout
    for flag in ("-c", "--config"):
        done = run_cli("config", "check", flag, str(config), env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == positional.stdout
    # The same file twice (spelled differently) is fine; two different files are not guessed between.
    same = run_cli("config", "check", "-c", "edge.yaml", str(config), cwd=tmp_path, env=env)
    assert same.returncode == 0, same.stderr
    other = tmp_path / "other.yaml"
    other.write_text("Mqtt: {Port: 2000}\n")
    both = run_cli("config", "check", "-c", str(config), str(other), env=env)
    assert both.returncode == 2 and both.stdout == ""
    assert_no_traceback(both)
    assert (
        f"error: Two different configuration files were given: {config} (-c/--config) and {other}"
        in both.stderr
    )
    assert "→ Give the file once" in both.stderr
    assert "-c/--config FILE" in run_cli("config", "check", "--help").stdout


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def test_config_check_prints_unset_as_empty_strings_as_the_readme_says(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME__")}
    done = run_cli("config", "check", env=env)
    assert done.returncode == 0, done.stderr
    assert "null" not in done.stdout
    printed = _leaves(yaml.safe_load(done.stdout))
    assert None not in printed.values()
    # Every key the manual's Configuration section shows as unset ("") is printed as "" too.
    manual = (REPO_ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    section = manual.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert 'empty strings mean "unset"' in section
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    unset_in_readme = [key for key, value in _leaves(yaml.safe_load(block.group(1))).items() if value == ""]
    assert ("Model", "Threshold") in unset_in_readme and ("Inbox", "ProcessedPath") in unset_in_readme
    for key in unset_in_readme:
        assert printed[key] == "", (key, printed[key])
    # Spelled as the README spells it, and read back as unset: the output is a valid configuration file.
    assert '  ProcessedPath: ""\n' in done.stdout and '  Threshold: ""\n' in done.stdout
    saved = tmp_path / "effective.yaml"
    saved.write_text(done.stdout)
    again = run_cli("config", "check", "-c", str(saved), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == done.stdout.splitlines()[1:]


def test_config_check_of_a_missing_file_says_it_does_not_exist(tmp_path: Path) -> None:
    done = run_cli("config", "check", "-c", "x.yaml", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert_no_traceback(done)
    where = tmp_path / "x.yaml"
    assert done.stderr.startswith(
        f"error: Cannot read configuration file x.yaml: it does not exist (looked for {where}).\n"
    )
    assert "→ Check the file name and folder" in done.stderr
    assert "Fix the named setting" not in done.stderr
    # The same message wherever --config is read, e.g. for the service itself.
    run = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert run.returncode == 2 and f"{tmp_path / 'nope.yaml'}: it does not exist." in run.stderr
    folder = run_cli("config", "check", "-c", str(tmp_path))
    assert folder.returncode == 2 and "it is a folder, not a file" in folder.stderr
    assert "Fix the named setting" not in folder.stderr


# -- 3. model verify --backend all / auto where LiteRT is not installed ------------------------
def test_verify_all_checks_the_installed_engines_and_names_the_missing_one(default_bundle: Path) -> None:
    done = run_cli("model", "verify", str(default_bundle), "--backend", "all", without=LITERT_MODULES)
    assert_no_traceback(done)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Neither ai-edge-litert" not in done.stdout + done.stderr
    assert "backend onnxruntime, threshold" in done.stdout
    assert "conformance check passed" in done.stdout and "on backend onnxruntime" in done.stdout
    skipped = [line for line in done.stdout.splitlines() if "backend litert" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "LiteRT is not installed here" in skipped[0]
    assert "pip install '.[litert]'" in done.stdout
    assert "checked: onnxruntime; skipped (not installed here): litert" in done.stdout


def test_verify_with_model_backend_auto_behaves_the_same(default_bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(f"Model: {{Backend: auto, BundlePath: {default_bundle}}}\n")
    done = run_cli("model", "verify", "-c", str(config), "--json", without=LITERT_MODULES)
    assert_no_traceback(done)
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout)  # stdout stays pure JSON: the skipped engine is noted on stderr
    assert [r["backend"] for r in reports] == ["onnxruntime"] and reports[0]["passed"] is True
    assert "backend litert: skipped" in done.stderr and "pip install '.[litert]'" in done.stderr


def test_verify_all_checks_litert_too_where_it_is_installed(default_bundle: Path) -> None:
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    done = run_cli("model", "verify", str(default_bundle), "--backend", "all", "--json")
    assert done.returncode == 0, done.stderr
    assert [r["backend"] for r in json.loads(done.stdout)] == ["onnxruntime", "litert"]
    assert "skipped" not in done.stderr


def test_verify_exits_2_only_when_no_engine_can_be_loaded(default_bundle: Path) -> None:
    done = run_cli(
        "model", "verify", str(default_bundle), "--backend", "all", without=LITERT_MODULES + ",onnxruntime"
    )
    assert done.returncode == 2
    assert_no_traceback(done)
    assert "backend onnxruntime: skipped" in done.stdout and "backend litert: skipped" in done.stdout
    assert "error: None of the engines model pneumonia-cxr" in done.stderr
    assert "(onnxruntime, litert) is installed here, so nothing could be checked." in done.stderr
    # An engine named explicitly is not skipped: its absence is the error, with what to do.
    named = run_cli("model", "verify", str(default_bundle), "--backend", "litert", without=LITERT_MODULES)
    assert named.returncode == 2 and named.stdout == ""
    assert_no_traceback(named)
    assert "error: LiteRT is not installed here" in named.stderr
    assert "→ Install it with pip install '.[litert]'" in named.stderr


def test_verify_help_names_the_litert_extra() -> None:
    out = run_cli("model", "verify", "--help").stdout
    assert "pip install '.[litert]'" in out and "skipped" in out


# -- 4. journal: size with the WAL, and the id file of a backup --------------------------------
def _journal_with_results(path: Path, n: int) -> Journal:
    journal = Journal(path)
    for i in range(n):
        record = journal.admit(f"{i:064x}", path.parent / f"scan{i}.dcm", 10).record
        message = {"message_id": f"m{i}", "result": "x" * 400}
        journal.record_result(
            record.id,
            message["message_id"],
            json.dumps(message),
            [Delivery("mqtt", "t", json.dumps(message), 1)],
        )
    return journal


def test_journal_check_counts_what_is_still_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    journal = _journal_with_results(path, 40)  # open, as under the running service: nothing checkpointed
    try:
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size > path.stat().st_size  # the situation of the issue: 4 KB live, WAL big
        text = run_cli("journal", "check", "--journal", str(path))
        as_json = run_cli("journal", "check", "--journal", str(path), "--json")
        backup = tmp_path / "backup.sqlite3"
        backed = run_cli("journal", "backup", "--journal", str(path), str(backup))
    finally:
        journal.close()
    assert text.returncode == as_json.returncode == backed.returncode == 0, text.stderr + backed.stderr
    report = json.loads(as_json.stdout)
    # The size reported is the backup's size, not the main file's alone.
    assert report["size_bytes"] == backup.stat().st_size
    assert report["file_bytes"] < report["size_bytes"] and report["wal_bytes"] > 0
    heading = text.stdout.splitlines()[0]
    assert heading.startswith(f"journal healthy: {path} ({report['size_bytes']} bytes; on disk: ")
    assert f"journal.sqlite3 {report['file_bytes']} bytes + journal.sqlite3-wal" in heading
    assert f"backup of {path} written: {backup} ({backup.stat().st_size} bytes)" in backed.stdout
    # Once checkpointed (the service closed), the same size, and no WAL left to mention.
    after = check_journal(path)
    assert after.size_bytes == report["size_bytes"] and after.wal_bytes == 0
    assert "-wal" not in run_cli("journal", "check", "--journal", str(path)).stdout


def test_backup_says_plainly_that_a_copy_has_no_id_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    journal = _journal_with_results(path, 2)
    journal_id = journal.journal_id
    journal.close()
    dest = tmp_path / "backup.sqlite3"
    backed = run_cli("journal", "backup", "--journal", str(path), str(dest))
    assert backed.returncode == 0, backed.stderr
    assert not id_path_for(dest).exists()
    (id_line,) = [line for line in backed.stdout.splitlines() if line.lstrip().startswith("id:")]
    assert journal_id in id_line
    assert "stored inside the copy; a backup has no .id file of its own, and needs none" in id_line
    assert "no journal.id beside it" not in id_line and "adopts" not in id_line
    assert "needs none" in run_cli("journal", "backup", "--help").stdout
    # Checking the copy, or a live journal whose id file is not written yet, is a note, not a fault.
    checked = run_cli("journal", "check", "--journal", str(dest))
    assert checked.returncode == 0 and "normal for a backup copy" in checked.stdout
    id_path_for(path).unlink()  # as after an upgrade from a version without ids
    live = run_cli("journal", "check", "--journal", str(path))
    assert live.returncode == 0 and live.stderr == ""
    assert "the service writes journal.id at its next start. Nothing to do" in live.stdout


def test_backup_to_a_folder_that_does_not_exist_yet_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    _journal_with_results(path, 2).close()
    dest = tmp_path / "backups"  # "backups/" as typed: a folder, not a file named backups
    backed = run_cli("journal", "backup", "--journal", str(path), f"{dest}/")
    assert backed.returncode == 0, backed.stderr
    assert dest.is_dir()
    (copy,) = dest.glob("journal-*.sqlite3")
    assert check_journal(copy).journal_id == check_journal(path).journal_id


def test_config_check_does_not_print_the_mqtt_password(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("Mqtt: {Username: edge, Password: s3cret-Pa55}\n", encoding="utf-8")
    done = run_cli("config", "check", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert "s3cret-Pa55" not in done.stdout
    assert "Password: <set, not shown>" in done.stdout and "Username: edge" in done.stdout
