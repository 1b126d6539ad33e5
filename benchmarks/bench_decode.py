"""Decode time per transfer syntax, and which files decode pixel-exactly.

For the WG04 radiographs (RG1 chest, RG2 hip, RG3 extremity) in every
transfer syntax the corpus has, each file is read into memory once (outside
the timed loop) and decoded ``--repeats`` times with the runtime's own
decoder (``edge_runtime.decode.decode_file``, in process: the sandbox adds a
pipe transfer, reported separately for one file). Prints p50/p95 per file
and a table comparing every file to its lossless reference in display
units (after the VOI window; 1.0 = full grey range). Last, for RG1_UNCR, the
cost of isolation: ``prepare_file`` (decode, preprocess for the bundled model,
pixel hash, heat-map preview) in process against the same through the
decode sandbox's child, which hands back only the small results.

Usage (from the repository root): python -m benchmarks.bench_decode [--repeats 7] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.bundle import default_bundle_path, load_bundle
from edge_runtime.decode import DecodeLimits, decode_file
from edge_runtime.prepare import PrepareOptions, prepare_file
from edge_runtime.sandbox import DecodeSandbox

REPO = Path(__file__).resolve().parents[1]

REFERENCES = {"RG1": "pydicom_data/RG1_UNCR.dcm", "RG2": "wg04/RG2_JPLL", "RG3": "wg04/RG3_JPLL"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    dicom = args.data / "dicom"
    if not dicom.is_dir():
        raise SystemExit(f"{dicom} not found (pass --data)")
    with open(dicom / "INVENTORY.tsv", newline="") as fh:
        rows = [
            r for r in csv.DictReader(fh, delimiter="\t") if Path(r["file"]).name.split("_")[0] in REFERENCES
        ]
    limits = DecodeLimits(max_pixels=10**8)
    references = {k: decode_file(dicom / v, limits).pixels for k, v in REFERENCES.items()}

    print(
        f"{'file':26s} {'transfer syntax':58s} {'p50 ms':>8s} {'p95 ms':>8s} "
        f"{'decoder':16s} {'vs reference':>22s}"
    )
    for row in sorted(rows, key=lambda r: r["file"]):
        path = dicom / row["file"]
        times = []
        image = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            image = decode_file(path, limits)
            times.append((time.perf_counter() - t0) * 1000)
        assert image is not None
        ref = references[Path(row["file"]).name.split("_")[0]]
        diff = np.abs(image.pixels - ref)
        if not diff.any():
            verdict = "pixel-exact"
        else:
            verdict = f"mean {diff.mean():.4f} p99 {np.percentile(diff, 99):.4f}"
        syntax = row["transfer_syntax"].split(" (1.2")[0][:58]
        print(
            f"{Path(row['file']).name:26s} {syntax:58s} {np.percentile(times, 50):8.1f} "
            f"{np.percentile(times, 95):8.1f} {image.decoder:16s} {verdict:>22s}"
        )

    sandbox = DecodeSandbox()
    options = PrepareOptions(load_bundle(default_bundle_path()).preprocessing, limits, preview_side=512)
    try:
        path = dicom / "pydicom_data/RG1_UNCR.dcm"
        sandbox.prepare(path, options)  # start the child
        inside, direct = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sandbox.prepare(path, options)
            inside.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            prepare_file(path, options)
            direct.append((time.perf_counter() - t0) * 1000)
        p_in, p_direct = np.percentile(inside, 50), np.percentile(direct, 50)
        print(
            f"\nRG1_UNCR.dcm (7 MB, 1955x1841), prepare_file: in process p50 {p_direct:.1f} ms, "
            f"through the decode sandbox p50 {p_in:.1f} ms (ratio {p_in / p_direct:.2f}: the "
            "cost of isolation)"
        )
    finally:
        sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
