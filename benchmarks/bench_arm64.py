"""ARM64 conformance, emulated: both bundled models on every backend they ship, on two ARM CPUs.

For each bundle in ``edge_runtime/models/`` and each backend it ships (ONNX Runtime, LiteRT),
under QEMU user mode (see :mod:`benchmarks.arm64`) on each ``--cpus`` model, by default
``neoverse-n1`` (AWS Graviton2: SDOT/UDOT, ``asimddp``) and ``cortex-a72`` (Raspberry Pi 4: none):

* ``edge-runtime model verify BUNDLE --backend B --json``: the verdict, the drift from the build
  machine on the bundle's conformance images, the heat-map drift (where the bundle has a heat-map
  output), and the CPU summary the runtime reports there (``int8_features``, ``probe``);
* the official Kermany test split (624 images, never used in training) through
  ``edge-runtime process`` there and natively on this x86-64 CPU, scored from the published
  messages: max |dp| (``findings[0].probability``), decisions that differ at the manifest's
  operating threshold, intended-use (OOD) verdicts that differ. ``process`` publishes no
  heat-map (it writes no reports), so heat-map drift comes from ``model verify`` only.

Emulation is slow (a few hundred ms per image): ``--limit N`` runs N images (an even spread
over the sorted split, both classes), and ``--full BUNDLE/BACKEND/CPU`` runs all of them for
that one combination while the rest use ``--limit``.

Usage (from the repository root, as root on x86-64 Linux with qemu-user; the first run builds
the cache with tests/arm64/sysroot.sh):
    python -m benchmarks.bench_arm64 [--cpus neoverse-n1 cortex-a72] [--limit 32]
        [--full pneumonia-cxr/onnxruntime/neoverse-n1] [--json arm64.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.arm64 import CPUS, REPO, arm64_env, run_arm64
from benchmarks.bench_backends import KERMANY_TEST, run_process
from edge_runtime.bundle import load_bundle
from edge_runtime.cpu import cpu_summary

MODELS = REPO / "edge_runtime" / "models"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data")
    parser.add_argument("--cpus", nargs="+", default=list(CPUS), choices=list(CPUS), help="QEMU CPU models")
    parser.add_argument(
        "--bundles", nargs="+", default=None, help="bundle folders' names (default: every bundle shipped)"
    )
    parser.add_argument("--backends", nargs="+", default=None, help="only these backends")
    parser.add_argument("--limit", type=int, default=None, help="test images per run (default: all 624)")
    parser.add_argument(
        "--full",
        action="append",
        default=[],
        metavar="BUNDLE/BACKEND/CPU",
        help="run every test image for this combination despite --limit (repeatable)",
    )
    parser.add_argument("--skip-verify", action="store_true", help="only the test split")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per emulated command")
    parser.add_argument("--json", type=Path, default=None, help="write every number as JSON here")
    return parser.parse_args()


def test_split(data: Path) -> list[Path]:
    root = data / KERMANY_TEST
    files = sorted((root / "NORMAL").glob("*.jpeg")) + sorted((root / "PNEUMONIA").glob("*.jpeg"))
    if len(files) != 624:
        raise SystemExit(f"expected the 624 Kermany test images under {root}, found {len(files)}")
    return files


def spread(files: list[Path], n: int | None) -> list[Path]:
    """``n`` files evenly spread over ``files`` (both classes of the sorted split), or all."""
    if n is None or n >= len(files):
        return files
    picks = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in picks]


def process_env(bundle: Path, backend: str) -> dict[str, str]:
    """What :func:`benchmarks.bench_backends.run_process` sets for the native run."""
    return {
        "EDGE_RUNTIME__MODEL__BACKEND": backend,
        "EDGE_RUNTIME__MODEL__BUNDLE_PATH": str(bundle),
        "EDGE_RUNTIME__MODEL__THREADS": "1",
    }


def verify_emulated(bundle: Path, backend: str, cpu: str, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    done = run_arm64(
        ["-m", "edge_runtime.cli", "model", "verify", str(bundle), "--backend", backend, "--json"],
        cpu,
        timeout,
        extra_env={"EDGE_RUNTIME__MODEL__THREADS": "1"},
    )
    seconds = time.perf_counter() - t0
    try:
        report = json.loads(done.stdout)[0]
    except (json.JSONDecodeError, IndexError):
        return {
            "verdict": f"ERROR (exit {done.returncode})",
            "error": done.stderr[-2000:],
            "seconds": seconds,
        }
    heat = report.get("heatmap") or {}
    # From the rows: the summary's maxima are rounded to 1e-6.
    heat_drifts = [row["heat_drift"] for row in report["rows"] if row.get("heat_drift") is not None]
    return {
        "verdict": "passed" if report["passed"] and done.returncode == 0 else "FAILED",
        "images": report["images"],
        "max_drift": max(row["drift"] for row in report["rows"]),
        "max_drift_allowed": report["max_drift_allowed"],
        "max_abs_diff_fp32": report["max_abs_diff"],
        "decisions_differing": report["decisions_differing"],
        "heat_max_drift": max(heat_drifts) if heat_drifts else None,
        "heat_max_drift_allowed": heat.get("max_drift_allowed"),
        "cpu": report["cpu"],
        "seconds": seconds,
    }


def process_emulated(bundle: Path, backend: str, cpu: str, files: list[Path], timeout: float) -> list[dict]:
    done = run_arm64(
        ["-m", "edge_runtime.cli", "process", *map(str, files)],
        cpu,
        timeout,
        extra_env=process_env(bundle, backend),
    )
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(messages) != len(files):
        raise SystemExit(f"emulated edge-runtime process ({backend}, {cpu}) failed: {done.stderr[-3000:]}")
    return messages


def compare(native: list[dict], emulated: list[dict], threshold: float) -> dict[str, Any]:
    """max |dp|, decisions at ``threshold`` and intended-use verdicts that differ (same files, same order)."""
    assert [m["input"]["sha256"] for m in native] == [m["input"]["sha256"] for m in emulated]
    p_x86 = np.array([m["findings"][0]["probability"] for m in native])
    p_arm = np.array([m["findings"][0]["probability"] for m in emulated])
    within_x86 = [m["intended_use"]["within"] for m in native]
    within_arm = [m["intended_use"]["within"] for m in emulated]
    dp = np.abs(p_x86 - p_arm)
    return {
        "images": len(native),
        "max_abs_dp": float(dp.max()),
        "identical": int((dp == 0).sum()),
        "decisions_differing": int(((p_x86 >= threshold) != (p_arm >= threshold)).sum()),
        "intended_use_differing": sum(a != b for a, b in zip(within_x86, within_arm, strict=True)),
        "infer_ms_p50": float(np.median([m["timings_ms"]["infer"] for m in emulated])),
    }


def main() -> None:
    args = parse_args()
    env = arm64_env()  # builds the cache the first time; Arm64Unavailable says why not
    split = test_split(args.data)
    bundles = sorted(p for p in MODELS.iterdir() if (p / "manifest.json").is_file())
    if args.bundles:
        bundles = [p for p in bundles if p.name in args.bundles]
    host = cpu_summary()
    print(f"x86-64 host: {host['model']}; INT8 features {', '.join(host['int8_features']) or 'none'}")
    print(f"emulator: {env.qemu} (-cpu {' / '.join(args.cpus)}); sysroot {env.sysroot}")
    rows: list[dict[str, Any]] = []
    cpu_seen: dict[str, Any] = {}
    for bundle_dir in bundles:
        bundle = load_bundle(bundle_dir)
        threshold = bundle.manifest.threshold
        backends = [b for b in dict.fromkeys(bundle.backends) if not args.backends or b in args.backends]
        for backend in backends:
            wanted = {
                cpu: spread(split, None if f"{bundle_dir.name}/{backend}/{cpu}" in args.full else args.limit)
                for cpu in args.cpus
            }
            widest = max(wanted.values(), key=len)
            t0 = time.perf_counter()
            native = run_process(bundle_dir, backend, widest)
            native_s = time.perf_counter() - t0
            # One message per file, in order (process exits non-zero when one fails); messages name
            # scans by a keyed reference, not the file's name.
            by_file = dict(zip(widest, native, strict=True))
            for cpu in args.cpus:
                row: dict[str, Any] = {"bundle": bundle_dir.name, "backend": backend, "cpu": cpu}
                if not args.skip_verify:
                    row["verify"] = verify_emulated(bundle_dir, backend, cpu, args.timeout)
                    cpu_seen.setdefault(cpu, row["verify"].get("cpu"))
                files = wanted[cpu]
                t0 = time.perf_counter()
                emulated = process_emulated(bundle_dir, backend, cpu, files, args.timeout)
                seconds = time.perf_counter() - t0
                mine = [by_file[path] for path in files]
                row["process"] = {
                    **compare(mine, emulated, threshold),
                    "threshold": threshold,
                    "seconds": seconds,
                    "native_seconds_all": native_s,
                }
                rows.append(row)
                print(line(row), flush=True)

    print()
    print(table(rows))
    print()
    for cpu, summary in cpu_seen.items():
        if summary:
            features = ", ".join(summary["int8_features"]) or "none"
            print(
                f"{cpu}: machine {summary['machine']}, model {summary['model']!r}, INT8 features "
                f"[{features}], int8_dot {summary['int8_dot']}, probe {summary['probe']}"
            )
    if args.json:
        args.json.write_text(json.dumps({"host_cpu": host, "rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def line(row: dict[str, Any]) -> str:
    v, p = row.get("verify", {}), row["process"]
    return (
        f"{row['bundle']}/{row['backend']}/{row['cpu']}: verify {v.get('verdict', '-')} "
        f"({v.get('seconds', 0):.0f} s); process {p['images']} images in {p['seconds']:.0f} s, "
        f"max |dp| vs x86 {p['max_abs_dp']:.3g}, {p['decisions_differing']} decision(s) differ"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'bundle':20s} {'backend':11s} {'cpu':11s} {'verify':7s} {'drift':>8s} {'heat_drift':>10s} "
        f"{'int8':>8s} {'images':>6s} {'max|dp|':>9s} {'same':>5s} {'dec!=':>5s} {'ood!=':>5s} "
        f"{'ver_s':>6s} {'proc_s':>7s}"
    )
    out = [head, "-" * len(head)]
    for row in rows:
        v, p = row.get("verify", {}), row["process"]
        heat = v.get("heat_max_drift")
        cpu = v.get("cpu") or {}
        out.append(
            f"{row['bundle']:20s} {row['backend']:11s} {row['cpu']:11s} {v.get('verdict', '-'):7s} "
            f"{v.get('max_drift', float('nan')):8.2e} "
            f"{'-' if heat is None else format(heat, '.2e'):>10s} {cpu.get('int8_dot', '-'):>8s} "
            f"{p['images']:6d} {p['max_abs_dp']:9.2e} {p['identical']:5d} {p['decisions_differing']:5d} "
            f"{p['intended_use_differing']:5d} {v.get('seconds', 0):6.0f} {p['seconds']:7.0f}"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
