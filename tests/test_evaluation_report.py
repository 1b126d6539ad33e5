"""The evaluation report (training/evaluate/evaluation_report/) end to end on a tiny real subset.

8 NORMAL and 8 PNEUMONIA (4 bacterial, 4 viral) images of the real Kermany
test split, the committed INT8 bundle, and a tiny FP32 ONNX model built
here (mean intensity -> softmax) standing in for the FP32 export, so the
side-by-side path runs too. The numbers in the Markdown are checked against
:mod:`training.evaluate.metrics` applied to probabilities recomputed independently
through the edge backend, one image at a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.evaluate.evaluation_report import (
    FIGURES,
    METRICS_NAME,
    PREDICTIONS_NAME,
    REPORT_NAME,
    add_report_parser,
    list_cases,
    run_from_args,
)
from training.evaluate.metrics import (
    average_precision,
    binary_metrics,
    bootstrap_auc_ci,
    confusion_matrix,
    expected_calibration_error,
    predictive_values,
    subgroup_metrics,
    wilson_interval,
)

KERMANY = Path("cxr/kermany_pneumonia_224")
PER_CLASS = 8
N_BOOT = 300  # fewer than the default 2000: the test checks plumbing and equality, not the CI's width


def _pick(folder: Path, pattern: str, n: int) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if len(files) < n:
        pytest.skip(f"need {n} files matching {pattern} in {folder}, found {len(files)}")
    return files[:n]


@pytest.fixture(scope="module")
def subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kermany-shaped folder with 16 real test images and the matching manifest.csv rows."""
    source = shared_data / KERMANY
    if not (source / "test").is_dir():
        pytest.skip(f"Kermany test split not found at {source / 'test'}")
    chosen = _pick(source / "test/NORMAL", "*.jpeg", PER_CLASS)
    chosen += _pick(source / "test/PNEUMONIA", "*_bacteria_*.jpeg", PER_CLASS // 2)
    chosen += _pick(source / "test/PNEUMONIA", "*_virus_*.jpeg", PER_CLASS // 2)
    root = tmp_path_factory.mktemp("kermany_subset")
    wanted = set()
    for path in chosen:
        rel = path.relative_to(source)
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
        wanted.add(rel.as_posix())
    if (source / "manifest.csv").is_file():
        with (
            open(source / "manifest.csv", newline="") as src,
            open(root / "manifest.csv", "w", newline="") as dst,
        ):
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
            writer.writeheader()
            writer.writerows(row for row in reader if row["path"] in wanted)
    return root


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory, default_bundle: Path) -> Path:
    """A real ONNX model with the bundle's input/output names and shape: brighter -> PNEUMONIA."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edge_runtime.bundle import load_bundle

    shape = ["batch", *load_bundle(default_bundle).preprocessing.sample_shape]

    w = np.array([[-4.0, 4.0], [0, 0], [0, 0]], dtype=np.float32)
    b = np.zeros(2, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny-fp32",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.flatten()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny_fp32") / "tiny.fp32.onnx"
    onnx.save(model, path)
    return path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def report(
    subset: Path, tiny_fp32: Path, default_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("report")
    args = _parse(
        [
            "evaluate-report",
            "--bundle",
            str(default_bundle),
            "--fp32",
            str(tiny_fp32),
            "--data",
            str(subset),
            "--split",
            "test",
            "--out",
            str(out),
            "--bootstrap",
            str(N_BOOT),
            "--threads",
            "2",
        ]
    )
    run_from_args(args)
    return out


def _tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (separator rows dropped; ``\\|`` is not a cell border)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(c and set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _table(md: str, first_header: str) -> dict[str, list[str]]:
    """The table whose header starts with ``first_header``: data rows keyed by their first cell."""
    for table in _tables(md):
        if table[0][0] == first_header:
            return {row[0]: row[1:] for row in table[1:]}
    raise AssertionError(f"no table headed {first_header!r} in the report")


def _rate(k: int, n: int) -> str:
    return f"{k / n:.4f} ({k}/{n})" if n else f"n/a ({k}/{n})"


def _edge_probabilities(bundle_dir: Path, fp32: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """P(pneumonia) recomputed the way the edge service does it: one image at a time."""
    import onnxruntime as ort

    from edge_runtime.backends import create_backend
    from edge_runtime.bundle import load_bundle
    from edge_runtime.decode import decode_file
    from edge_runtime.preprocess import preprocess

    bundle = load_bundle(bundle_dir)
    positive = bundle.labels.index(bundle.positive_label)
    backend = create_backend("onnxruntime", threads=2)
    backend.load(bundle)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    p_int8, p_fp32 = [], []
    for path in files:
        sample = preprocess(decode_file(path).pixels, bundle.preprocessing)[None]
        p_int8.append(float(backend.infer(sample)[0, positive]))
        p_fp32.append(float(session.run(None, {"input": sample})[0][0, positive]))
    backend.close()
    return np.array(p_int8), np.array(p_fp32)


def test_report_writes_markdown_and_every_figure(report: Path) -> None:
    md = report / REPORT_NAME
    assert md.is_file() and md.stat().st_size > 0
    for name in FIGURES.values():
        png = report / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md.read_text(), f"{name} is not linked from the report"
    assert (report / METRICS_NAME).stat().st_size > 0 and (report / PREDICTIONS_NAME).stat().st_size > 0


def test_report_numbers_equal_the_metric_functions(
    report: Path, subset: Path, tiny_fp32: Path, default_bundle: Path
) -> None:
    from edge_runtime.bundle import load_bundle

    md = (report / REPORT_NAME).read_text()
    with open(report / PREDICTIONS_NAME, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * PER_CLASS
    y = np.array([1 if r["label"] == "PNEUMONIA" else 0 for r in rows])
    groups = [r["group"] for r in rows]
    assert sorted(groups) == sorted(["normal"] * 8 + ["bacteria"] * 4 + ["virus"] * 4)
    probs = {
        "INT8": np.array([float(r["p_int8"]) for r in rows]),
        "FP32": np.array([float(r["p_fp32"]) for r in rows]),
    }

    # The report's probabilities are the edge's, recomputed independently image by image.
    edge_int8, edge_fp32 = _edge_probabilities(default_bundle, tiny_fp32, [subset / r["path"] for r in rows])
    np.testing.assert_allclose(probs["INT8"], edge_int8, atol=1e-5)
    np.testing.assert_allclose(probs["FP32"], edge_fp32, atol=1e-5)

    bundle = load_bundle(default_bundle)
    t = bundle.threshold
    assert f"{t!r} = manifest `operating_point.threshold`" in md
    assert "NOT FOR DIAGNOSTIC USE" in md and "not tuned on this" in md
    assert bundle.manifest.files["model.int8.onnx"] in md
    assert "| n | 16 images: 8 NORMAL, 8 PNEUMONIA (4 bacterial pneumonia, 4 viral pneumonia) |" in md

    free = _table(md, "threshold-free metric")
    at = _table(md, "metric")
    subtype = _table(md, "group")
    for col, (name, p) in enumerate(probs.items()):
        lo, hi = bootstrap_auc_ci(y, p, n_boot=N_BOOT, seed=0)
        m = binary_metrics(y, p, t)
        assert free["AUC"][col] == f"{m['auc']:.4f}"
        assert free["AUC 95 % CI"][col] == f"[{lo:.4f}, {hi:.4f}]"
        assert free["average precision"][col] == f"{average_precision(y, p):.4f}"
        assert free["ECE (15 bins)"][col] == f"{expected_calibration_error(y, p, 15):.4f}"

        for offset, threshold in ((0, t), (1, 0.5)):
            m = binary_metrics(y, p, threshold)
            pv = predictive_values(y, p, threshold)
            cell = 2 * col + offset
            assert at["accuracy"][cell] == _rate(m["tp"] + m["tn"], m["n"])
            assert at["accuracy"][cell].startswith(f"{m['accuracy']:.4f}")
            assert at["sensitivity"][cell] == _rate(m["tp"], m["n_positive"])
            assert at["specificity"][cell] == _rate(m["tn"], m["n_negative"])
            assert at["PPV"][cell] == _rate(m["tp"], m["tp"] + m["fp"])
            assert at["NPV"][cell] == _rate(m["tn"], m["tn"] + m["fn"])
            if not np.isnan(pv["ppv"]):
                assert at["PPV"][cell].startswith(f"{pv['ppv']:.4f}")
            if not np.isnan(pv["npv"]):
                assert at["NPV"][cell].startswith(f"{pv['npv']:.4f}")

        cm = confusion_matrix(y, p, t)
        table = _table(md, f"{name} @ {t:.5g}")
        assert table["true NORMAL"][:2] == [str(cm[0, 0]), str(cm[0, 1])]
        assert table["true PNEUMONIA"][:2] == [str(cm[1, 0]), str(cm[1, 1])]

        sub = subgroup_metrics(y, p, groups, t)
        for group, title, (k, n) in (
            ("bacteria", "bacterial pneumonia", (sub["bacteria"]["tp"], sub["bacteria"]["n_positive"])),
            ("virus", "viral pneumonia", (sub["virus"]["tp"], sub["virus"]["n_positive"])),
            ("normal", "normal", (sub["normal"]["tn"], sub["normal"]["n_negative"])),
        ):
            lo, hi = wilson_interval(k, n)
            assert subtype[title][1] == str(sub[group]["n"])
            assert subtype[title][2 + col] == f"{_rate(k, n)} [{lo:.4f}, {hi:.4f}]"

    # metrics.json holds the same values unrounded.
    metrics = json.loads((report / METRICS_NAME).read_text())
    assert metrics["models"]["INT8"]["auc"] == pytest.approx(binary_metrics(y, probs["INT8"], t)["auc"])
    assert metrics["threshold"] == t and metrics["n"] == 16


def test_command_in_the_report_reproduces_it(report: Path, tmp_path: Path) -> None:
    md = (report / REPORT_NAME).read_text()
    command = re.search(r"```\n(python -m training evaluate-report .*)\n```", md)
    assert command, "the report does not quote its command"
    argv = shlex.split(command.group(1))
    assert argv[:4] == ["python", "-m", "training", "evaluate-report"]
    argv[argv.index("--out") + 1] = str(tmp_path)
    run_from_args(_parse(argv[3:]))
    first = json.loads((report / METRICS_NAME).read_text())["models"]
    again = json.loads((tmp_path / METRICS_NAME).read_text())["models"]
    assert again == first


def test_subtypes_come_from_the_file_name_without_a_manifest(subset: Path, tmp_path: Path) -> None:
    shutil.copytree(subset / "test", tmp_path / "test")
    cases = list_cases(tmp_path, "test")
    assert {c.group for c in cases} == {"normal", "bacteria", "virus"}
    assert all((c.group == "normal") == (c.label == 0) for c in cases)


def test_an_image_that_differs_from_the_manifest_is_refused(subset: Path, tmp_path: Path) -> None:
    if not (subset / "manifest.csv").is_file():
        pytest.skip("the shared Kermany folder has no manifest.csv")
    shutil.copytree(subset, tmp_path / "data")
    victim = sorted((tmp_path / "data/test/NORMAL").glob("*.jpeg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        list_cases(tmp_path / "data", "test")


def test_cli_help_explains_the_report() -> None:
    pytest.importorskip("torch")  # python -m training's parser lists the torch model registry
    out = subprocess.run(
        [sys.executable, "-m", "training", "evaluate-report", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for word in ("--fp32", "--split", "manifest", "threshold", "ECE", "subtype", "nothing is tuned"):
        assert word in out.stdout, word
