"""The service against its own decode + inference floor: throughput, latency, backends, scale, cold start.

One run, on this machine, measures (issue #16, item 1):

(a) **throughput** per input kind (JPEG, PNG 16-bit, DICOM uncompressed, RLE,
    JPEG-LS, JPEG 2000). The *floor*: the very ``decode_file -> preprocess ->
    backend.infer_outputs`` calls of the runtime, on the bundled model with the
    service's thread count, in a pool of ``--workers`` processes over N distinct
    copies (scans/s). The *service*: N distinct copies written as ``NAME.part``
    into the inbox of a real :class:`EdgeService` and then renamed at once, with
    a real Mosquitto, until every result has its PUBACK (the drainers'
    ``on_delivered``), scans/s. The service runs twice: with the default reports
    (heat-map PNG and Secondary Capture; for DICOM also SR and FHIR) and with
    ``Reports.DicomSr/Fhir/Heatmap`` false. A second floor, *floor + reports*,
    runs the service's own analysis and report build per file in the same pool
    (in-process: no journal, decoder child or MQTT), so that the service with
    reports can be compared with the same work done bare. Both floors and both
    services alternate per round and kind (the order flips every round), so a
    busy moment of the machine hurts all four; medians over the rounds and service / floor ratios
    are printed, with the mean per-scan stage times of both sides.
(b) **single-scan latency**: one copy at a time, rename -> PUBACK (default
    service), p50/p95, next to the single-scan floor (decode + preprocess +
    infer in this process, one at a time), alternating scan by scan; with the
    service's own stage timings and what is left ("other": inbox detection,
    journal, outcome, MQTT hand-over and PUBACK).
(c) **backends**: ONNX Runtime FP32 (``--fp32``, optional) and INT8, LiteRT INT8
    (if ``ai-edge-litert`` imports), batch 1, 1 and 2 threads, p50/p95 ms,
    interleaved in blocks.
(d) **scale**: ``edge-runtime run`` as a subprocess (the real CLI, JSON logs
    at INFO to a pipe), 1000 JPEGs (``--quick``: 200) dropped at once: time to
    drain, result latency (rename -> arrival at a real MQTT subscriber) by
    position in the backlog, and the RSS of the service's process tree over
    time; then a few copies of every large kind, for the peak with big images.
(e) **cold start** of that subprocess: exec -> first log line -> "starting" ->
    retained ``online`` status, and exec -> first result for one scan already in
    the inbox (it waits ``Inbox.SettleSeconds``, as any file found at start-up
    does); peak RSS of the service plus its decoder children (sum over the
    process tree, sampled; also the sum of VmHWM and of PSS where readable).

Then every target of the issue is printed next to its measured value with
MET/MISSED. Tables go to stdout; ``--out`` gets ``bench_throughput.json``
(every number), ``bench_throughput.png`` (needs matplotlib), the service logs,
and with ``--profile`` py-spy profiles of the subprocess service (a JPEG and an
uncompressed DICOM drop, after the scale run so its numbers are not disturbed)
with a summary of where the samples fall.

Optional parts say why they were skipped: the FP32 model, LiteRT, matplotlib,
psutil (``/proc`` is read instead), py-spy. Needs ``mosquitto`` and the shared
data (``--data``, default ../shared/data); derived inputs (the 16-bit PNG and
the RLE file, both from RG1_UNCR's pixels) are made outside any timed part.

Usage (from the repository root):
    python -m benchmarks.bench_throughput --quick                 # a few minutes
    python -m benchmarks.bench_throughput [--rounds 3] [--out DIR] [--profile]
    python -m benchmarks.bench_throughput --parts throughput --kinds jpeg,uncompressed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.throughput.common import REPO
from benchmarks.throughput.inputs import KIND, KINDS
from benchmarks.throughput.run import run

__all__ = ["main", "parse_args"]

#: The parts ``--parts`` chooses from (scale = d + e).
PARTS = ("throughput", "latency", "backends", "scale")
DEFAULT_FP32 = REPO / "runs" / "k96" / "model.fp32.onnx"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small N everywhere (a few minutes)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-throughput"), help="folder for JSON, PNG, logs"
    )
    parser.add_argument("--workers", type=int, default=2, help="service workers = floor pool processes")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 2, --quick 2)")
    parser.add_argument(
        "--scale-n", type=float, default=1.0, help="multiply every throughput N by this (e.g. 0.5, 3)"
    )
    parser.add_argument("--latency-repeats", type=int, default=None, help="single scans per input (8 / 30)")
    parser.add_argument("--backend-runs", type=int, default=None, help="inferences per backend (100 / 500)")
    parser.add_argument(
        "--scale", type=int, default=None, help="JPEGs dropped at once (default 1000, --quick 200)"
    )
    parser.add_argument("--fp32", type=Path, default=DEFAULT_FP32, help="FP32 ONNX model (optional)")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the bundled one)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (scale = d + e)",
    )
    parser.add_argument(
        "--kinds", default=",".join(k.key for k in KINDS), help="comma-separated subset of the input kinds"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="log level of the in-process services (the shipped default: INFO)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the subprocess service (after d)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or 2
    args.latency_repeats = args.latency_repeats or (8 if args.quick else 30)
    args.backend_runs = args.backend_runs or (100 if args.quick else 500)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for p in args.parts:
        if p not in PARTS:
            parser.error(f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    for k in args.kinds:
        if k not in KIND:
            parser.error(f"unknown kind {k!r} (choose from {', '.join(KIND)})")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
