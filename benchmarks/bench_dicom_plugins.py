"""Which of pydicom's installed pixel plugins decodes each transfer syntax fastest, and identically.

pydicom 3 tries its plugins for a transfer syntax in a fixed order (GDCM
first where it is installed) and the first one that works wins. For the
runtime that order is a choice with two sides: speed, and the pixels
themselves, since ``message_id`` and the model's input come from them. So
for every compressed file in the shared data's DICOM inventory this script
decodes the pixel data with each available plugin (``pixel_array(...,
decoding_plugin=NAME)``, ``--repeats`` times, interleaved), and prints per
file and plugin the p50 time, the ratio to pydicom's default choice, and
whether the pixels are bit-identical to the default's.

The runtime's preference (``edge_runtime.decode.dicom.PREFERRED_PLUGINS``)
is printed beside it: a syntax may only prefer a plugin that is faster and
identical on every file here. For lossy syntaxes identity is the corpus's
evidence only: decoders may round differently, so one is preferred only where
it matched on every file (JPEG baseline: Pillow and GDCM both use the
IJG-exact integer IDCT).

Usage (from the repository root):
    python -m benchmarks.bench_dicom_plugins [--repeats 5] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from edge_runtime.cpu import cpu_summary
from edge_runtime.decode.dicom import PREFERRED_PLUGINS, plugin_order

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="decodes per file and plugin (default 5)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    dicom = args.data / "dicom"
    if not (dicom / "INVENTORY.tsv").is_file():
        raise SystemExit(f"{dicom / 'INVENTORY.tsv'} not found (pass --data)")

    import pydicom
    import pydicom.errors
    from pydicom.pixels import pixel_array
    from pydicom.uid import UID

    with open(dicom / "INVENTORY.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["decode_pydicom"] == "ok"]
    cpu = cpu_summary()
    print(
        f"CPU: {cpu['model']} ({cpu['machine']}), {os.cpu_count()} cores; {', '.join(cpu['int8_features'])}"
    )
    print(f"pydicom {pydicom.__version__}; {args.repeats} decodes per file and plugin, interleaved\n")
    print(f"{'file':44s} {'syntax':10s} {'plugin':10s} {'p50 ms':>8s} {'vs default':>10s} {'pixels':>10s}")
    verdicts: dict[str, dict[str, list[tuple[float, bool]]]] = {}
    for row in sorted(rows, key=lambda r: r["file"]):
        path = dicom / row["file"]
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue  # no file meta (a raw data set): no transfer syntax to choose a plugin for
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_compressed:
            continue
        plugins = plugin_order(syntax)
        if len(plugins) < 2:
            continue
        data = path.read_bytes()
        times: dict[str, list[float]] = {p: [] for p in plugins}
        arrays: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for plugin in plugins:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    try:
                        arr = pixel_array(pydicom.dcmread(_bytes_io(data)), decoding_plugin=plugin)
                    except Exception as exc:
                        times[plugin].append(float("nan"))
                        arrays.setdefault(plugin, np.array([]))
                        print(f"  {plugin} failed on {row['file']}: {str(exc)[:80]}")
                        continue
                    times[plugin].append((time.perf_counter() - t0) * 1000)
                arrays.setdefault(plugin, arr)
        default = plugins[0]
        base = statistics.median(times[default])
        for plugin in plugins:
            p50 = statistics.median(times[plugin])
            if arrays[plugin].size == 0:
                verdict = "failed"
            elif arrays[default].size == 0:
                verdict = "no ref."  # pydicom's first choice failed: nothing to compare with
            else:
                same = np.array_equal(arrays[plugin], arrays[default])  # False for another shape too
                verdict = "identical" if same else "DIFFERENT"
                verdicts.setdefault(str(syntax), {}).setdefault(plugin, []).append((p50 / base, same))
            print(
                f"{row['file'][-44:]:44s} {str(syntax)[-8:]:10s} {plugin:10s} {p50:8.1f} "
                f"{p50 / base:10.2f} {verdict:>10s}"
            )

    print("\nper transfer syntax: median time ratio to pydicom's default (identical on every file?)")
    for uid, plugins in sorted(verdicts.items()):
        name = UID(uid).name
        summary = ", ".join(
            f"{p} {statistics.median(r for r, _ in v):.2f} ({'yes' if all(s for _, s in v) else 'NO'})"
            for p, v in plugins.items()
        )
        print(
            f"  {name[:58]:58s} {summary}; runtime prefers: {PREFERRED_PLUGINS.get(uid, '(pydicom order)')}"
        )
    return 0


def _bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


if __name__ == "__main__":
    sys.exit(main())
