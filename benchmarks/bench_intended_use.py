"""Does the bundled model know when a scan is outside its intended use? (issue 26)

Every number comes from the **published result messages** of ``edge-runtime process`` (their
``intended_use`` verdict and ``findings``), per backend, on sets the model never saw while it
was fitted or its threshold set (the OOD statistics come from the training split, the
threshold from validation):

* in scope: the official Kermany test split (goal: >= 95 % within the intended use), with the
  model's AUC and accuracy at the operating point on all 624 images;
* out of scope: the adult NIH ChestX-ray14 subset (goal: >= 90 % flagged); non-chest medical
  images from the shared DICOM corpus (CT, MR, NM, hip, hand, spine, secondary captures),
  saved as PNG so that no header helps (goal: >= 95 %); natural photographs (scikit-learn's
  two sample images, tiled; goal: >= 95 %); Kermany test images rotated by 90 degrees and
  inverted (a lost MONOCHROME1; goal: >= 90 %); horizontally flipped (reported only: a
  flipped chest is still a chest);
* Kermany test images as DICOM with an adult Patient's Age (goal: all flagged);
* the cost of the features output and the score per scan (goal: <= 5 % of inference time):
  the ONNX model with and without its features branch, interleaved A B A B, and the score
  alone; each on this CPU, whose flags are printed.

Usage (repository root): ``python -m benchmarks.bench_intended_use [--backends onnxruntime litert]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_backends import run_process
from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.cpu import cpu_summary
from edge_runtime.decode import decode_file
from edge_runtime.intake import ScopeCheck
from edge_runtime.preprocess import preprocess
from edge_runtime.samples import write_chest_cr
from training.evaluate.metrics import binary_metrics

REPO = Path(__file__).resolve().parents[1]
KERMANY_TEST = Path("cxr/kermany_pneumonia_224/test")
NIH = Path("cxr/nih_chestxray14_1024_subset/images")
#: One file per distinct non-chest image of the shared DICOM corpus (other encodings of the same
#: image are left out, so each image counts once).
NON_CHEST = (
    "pydicom_testfiles/CT_small.dcm",
    "pydicom_testfiles/MR_small.dcm",
    "pydicom_testfiles/JPGExtended.dcm",
    "pydicom_testfiles/CR1_6154_cspine_16x16.dcm",
    "pydicom_testfiles/SC_rgb_jpeg_dcmtk.dcm",
    "pydicom_testfiles/image_dfl.dcm",
    "pydicom_data/mlut_18.dcm",
    "pydicom_data/vlut_04.dcm",
    "wg04/RG2_JPLL",
    "wg04/RG3_JPLL",
)
GOALS = {
    "kermany_test": ("within", 0.95),
    "nih_adults": ("flagged", 0.90),
    "non_chest_png": ("flagged", 0.95),
    "natural_png": ("flagged", 0.95),
    "rotated_90": ("flagged", 0.90),
    "inverted": ("flagged", 0.90),
    "adult_age_dicom": ("flagged", 1.0),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder"
    )
    parser.add_argument("--bundle", type=Path, default=default_bundle_path(), help="model bundle")
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "litert"], help="engines to measure")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images per set (0: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--cost-only", action="store_true", help="only the features branch's cost")
    return parser.parse_args()


def _png(path: Path, grey: np.ndarray) -> Path:
    import cv2

    cv2.imwrite(str(path), np.clip(np.rint(grey * 255), 0, 255).astype(np.uint8))
    return path


def build_sets(data: Path, work: Path, limit: int) -> tuple[dict[str, list[Path]], np.ndarray]:
    """Every set as files on disk, and the Kermany test labels (1 = PNEUMONIA)."""
    import cv2

    def cap(items: list[Path]) -> list[Path]:
        """At most ``limit`` items, spread over the sorted list (both classes of the test split)."""
        return items[:: max(1, len(items) // limit)][:limit] if limit else items

    test = cap(sorted((data / KERMANY_TEST).glob("*/*.jpeg")))
    labels = np.asarray([int(p.parent.name == "PNEUMONIA") for p in test])
    sets: dict[str, list[Path]] = {
        "kermany_test": test,
        "nih_adults": cap(sorted((data / NIH).glob("*.png"))),
    }
    for name, transform in (
        ("rotated_90", lambda g: np.ascontiguousarray(np.rot90(g))),
        ("inverted", lambda g: 1.0 - g),
        ("flipped", lambda g: np.ascontiguousarray(g[:, ::-1])),
    ):
        folder = work / name
        folder.mkdir()
        sets[name] = [_png(folder / f"{p.stem}.png", transform(decode_file(p).pixels)) for p in test]
    folder = work / "non_chest"
    folder.mkdir()
    sets["non_chest_png"] = [
        _png(folder / f"{Path(name).name.replace('.dcm', '')}.png", decode_file(data / "dicom" / name).pixels)
        for name in NON_CHEST
        if (data / "dicom" / name).is_file()
    ]
    from sklearn.datasets import load_sample_images

    folder = work / "natural"
    folder.mkdir()
    natural = []
    for index, image in enumerate(load_sample_images().images):
        grey = image.mean(axis=2) / 255.0
        rows, cols = grey.shape
        for top in range(0, rows - 200, 100):
            for left in range(0, cols - 200, 150):
                tile = grey[top : top + 200, left : left + 200]
                natural.append(_png(folder / f"photo{index}-{top}-{left}.png", tile))
    sets["natural_png"] = natural
    folder = work / "adult_dicom"
    folder.mkdir()
    sets["adult_age_dicom"] = [
        write_chest_cr(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), folder / f"{p.stem}.dcm", patient_age="045Y")
        for p in test
    ]
    return sets, labels


def summarise(messages: list[dict[str, Any]]) -> dict[str, Any]:
    within = np.asarray([m["intended_use"]["within"] for m in messages])
    reasons: dict[str, int] = {}
    for m in messages:
        for reason in m["intended_use"]["reasons"]:
            key = reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "n": len(messages),
        "within": float(within.mean()) if len(within) else float("nan"),
        "flagged": float(1 - within.mean()) if len(within) else float("nan"),
        "no_decision_when_flagged": all(
            m["decision"] is None for m in messages if not m["intended_use"]["within"]
        ),
        "urgent_when_flagged": sum(
            m["priority"] == "urgent" for m in messages if not m["intended_use"]["within"]
        ),
        "reasons": reasons,
    }


def model_metrics(messages: list[dict[str, Any]], labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUC and accuracy at the operating point over every test image (in or out of scope)."""
    p = np.asarray([m["findings"][0]["probability"] for m in messages])
    metrics = binary_metrics(labels, p, threshold)
    within = np.asarray([m["intended_use"]["within"] for m in messages])
    inside = binary_metrics(labels[within], p[within], threshold) if within.sum() > 10 else {}
    return {"all": metrics, "within_only": inside}


def _without_features(model_path: Path, output: str) -> bytes:
    """The ONNX model without its features output and the nodes only that output needs."""
    import onnx

    model = onnx.load(str(model_path))
    kept = [o for o in model.graph.output if o.name != output]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    needed = {o.name for o in kept}
    nodes = list(model.graph.node)
    keep: list[Any] = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    return bytes(model.SerializeToString())


def cost(bundle_dir: Path, samples: np.ndarray, rounds: int = 9) -> dict[str, Any]:
    """Inference with and without the features branch (ONNX, 1 thread, A B A B) and the score alone."""
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    features = bundle.manifest.output.features
    if features is None:
        return {"note": "the bundle has no features output"}
    path = bundle.artifact("onnxruntime").path
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with_branch = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    without = ort.InferenceSession(
        _without_features(path, features.name), options, providers=["CPUExecutionProvider"]
    )
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for name, session in (("without", without), ("with", with_branch)):
            start = time.perf_counter()
            for x in samples:
                session.run(None, {"input": x[None]})
            times[name].append((time.perf_counter() - start) * 1000 / len(samples))
    scope = ScopeCheck.from_bundle(bundle, "onnxruntime")
    rows = with_branch.run([features.name], {"input": samples[:1]})[0]
    assert scope.ood is not None
    start = time.perf_counter()
    for _ in range(1000):
        scope.ood.score(rows)
    score_ms = (time.perf_counter() - start) / 1000 * 1000
    infer_without = statistics.median(times["without"])
    infer_with = statistics.median(times["with"])
    return {
        "infer_ms_without_features": round(infer_without, 3),
        "infer_ms_with_features": round(infer_with, 3),
        "score_ms": round(score_ms, 4),
        "overhead_pct": round(100 * (infer_with - infer_without + score_ms) / infer_without, 2),
        "rounds": rounds,
        "images": len(samples),
    }


def main() -> None:
    args = parse_args()
    if not (args.data / KERMANY_TEST).is_dir():
        raise SystemExit(f"{args.data / KERMANY_TEST} is missing: this benchmark needs the shared data")
    bundle = load_bundle(args.bundle)
    cpu = cpu_summary()
    print(f"CPU: {cpu.get('model')} | INT8 dot: {cpu.get('int8_dot')} | flags: {cpu.get('int8_features')}")
    print(f"model: {bundle.name} {bundle.version} ({args.bundle})")
    use = bundle.manifest.intended_use
    if use.ood is not None:
        fits = {name: use.ood.for_backend(name).threshold for name in bundle.backends}
        print(f"intended use: ages {use.age_years}; OOD {use.ood.method}, thresholds {fits}")
    else:
        print(f"intended use: ages {use.age_years}; no OOD check")
    report: dict[str, Any] = {"cpu": cpu, "model": f"{bundle.name} {bundle.version}", "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-intended-use-") as tmp:
        sets, labels = build_sets(args.data, Path(tmp), args.limit)
        for backend in [] if args.cost_only else args.backends:
            if backend not in bundle.backends:
                print(f"\n{backend}: the bundle has no model file for it; skipped")
                continue
            print(f"\n== {backend} ==")
            rows: dict[str, Any] = {}
            for name, files in sets.items():
                messages = run_process(args.bundle, backend, files)
                rows[name] = summarise(messages)
                if name == "kermany_test":
                    rows[name]["model"] = model_metrics(messages, labels, bundle.threshold)
                goal = GOALS.get(name)
                verdict = ""
                if goal is not None:
                    key, target = goal
                    met = rows[name][key] >= target
                    verdict = f"goal {key} >= {target:.0%}: {'PASS' if met else 'MISS'}"
                print(
                    f"{name:16s} n={rows[name]['n']:4d} within {rows[name]['within']:6.1%} "
                    f"flagged {rows[name]['flagged']:6.1%}  {verdict}  {rows[name]['reasons']}"
                )
                assert rows[name]["no_decision_when_flagged"] and rows[name]["urgent_when_flagged"] == 0
            model = rows["kermany_test"]["model"]["all"]
            auc_goal = "PASS" if model["auc"] >= 0.975 else "MISS"
            accuracy_goal = "PASS" if model["accuracy"] >= 0.935 else "MISS"
            print(
                f"model on all {len(labels)} test images: AUC {model['auc']:.4f} (goal >= 0.975: "
                f"{auc_goal}), accuracy {model['accuracy']:.4f} (goal >= 0.935: {accuracy_goal}), "
                f"sensitivity {model['sensitivity']:.4f}, specificity {model['specificity']:.4f}"
            )
            report["backends"][backend] = rows
        samples = np.stack(
            [preprocess(decode_file(p).pixels, bundle.preprocessing) for p in sets["kermany_test"][:100]]
        )
    report["cost"] = cost(args.bundle, samples)
    c = report["cost"]
    if "overhead_pct" in c:
        print(
            f"\ncost (onnxruntime, 1 thread, {c['images']} images x {c['rounds']} rounds, A B A B): "
            f"inference {c['infer_ms_without_features']} ms without the features branch, "
            f"{c['infer_ms_with_features']} ms with it; score {c['score_ms']} ms; overhead "
            f"{c['overhead_pct']} % (goal <= 5 %: {'PASS' if c['overhead_pct'] <= 5 else 'MISS'})"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
