"""The report: the tables printed after a run, and each target of issue #16 as MET or MISSED.

Apart from the measurements so that the numbers (also written to ``bench_throughput.json``) are
taken in one place and formatted in another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.throughput.common import STAGES, pct, say
from benchmarks.throughput.inputs import KIND

#: The targets of issue #16.
TARGET_RATIO = 0.90
TARGET_P95 = 1.2
TARGET_COLD_S = 1.0
TARGET_RSS_MB = 300.0


def rule(head: str) -> None:
    """A table's column heads and the line under them."""
    say(head)
    say("-" * len(head))


def print_throughput(out: dict[str, Any], workers: int) -> None:
    say(
        f"\nthroughput ({workers} workers; floor = {workers}-process pool of decode_file -> preprocess -> "
        "infer; service = N copies renamed into the inbox at once, until every PUBACK; medians)"
    )
    head = (
        f"{'input':30s} {'N':>4s} {'floor/s':>8s} {'service/s':>9s} {'ratio':>6s} "
        f"{'no-reports/s':>12s} {'ratio':>6s} {'floor+reports/s':>15s} {'service/it':>10s}"
    )
    rule(head)
    for key, row in out.items():
        say(
            f"{KIND[key].label:30s} {row['n']:4d} {row['floor_median']:8.1f} {row['service_median']:9.1f} "
            f"{row['ratio']:6.2f} {row['service_no_reports_median']:12.1f} {row['ratio_no_reports']:6.2f} "
            f"{row['floor_reports_median']:15.1f} {row['ratio_vs_floor_reports']:10.2f}"
        )
    say(
        "(floor+reports: the same pool running the service's own analysis and report build per file, "
        "in-process, with no journal, decoder child or MQTT; service/it = service / floor+reports)"
    )
    say("\nper-scan stage means under load, ms (floor: in the pool; service: its own timings_ms)")
    head = (
        f"{'input':30s} {'side':12s} {'hash':>6s} {'decode':>7s} {'prep':>6s} {'infer':>6s} "
        f"{'reports':>7s} {'queue p50':>9s}"
    )
    rule(head)
    for key, row in out.items():
        fl = np.asarray(row["floor_stages_ms"])
        say(
            f"{KIND[key].label:30s} {'floor':12s} {'':>6s} {fl[:, 0].mean():7.1f} {fl[:, 1].mean():6.1f} "
            f"{fl[:, 2].mean():6.1f} {'':>7s} {'':>9s}"
        )
        for which, label in (("service", "service"), ("service_no_reports", "no-reports")):
            t = row["service_stages_ms"][which]

            def mean(k: str, t: list[dict[str, float]] = t) -> float:
                return float(np.mean([x.get(k, 0.0) for x in t]))

            say(
                f"{'':30s} {label:12s} {mean('hash'):6.1f} {mean('decode'):7.1f} {mean('preprocess'):6.1f} "
                f"{mean('infer'):6.1f} {mean('reports'):7.1f} "
                f"{pct([x.get('queue', 0.0) for x in t], 50):9.1f}"
            )


def print_latency(out: dict[str, Any]) -> None:
    say(
        "\nsingle-scan latency, ms (service: rename -> PUBACK, one scan at a time; floor: decode + "
        "preprocess + infer in-process)"
    )
    head = (
        f"{'input':30s} {'floor p50':>9s} {'p95':>7s} {'service p50':>11s} {'p95':>7s} {'ratio':>5s} "
        f"{'no-reports p50':>14s} {'p95':>7s} {'ratio':>5s}"
    )
    rule(head)
    for key, row in out.items():
        say(
            f"{KIND[key].label:30s} {row['floor_p50']:9.1f} {row['floor_p95']:7.1f} "
            f"{row['service_p50']:11.1f} {row['service_p95']:7.1f} {row['ratio_p95']:5.2f} "
            f"{row['service_no_reports_p50']:14.1f} {row['service_no_reports_p95']:7.1f} "
            f"{row['ratio_p95_no_reports']:5.2f}"
        )
    say("(ratio = service p95 / floor p95)")
    say(
        "\nwhere a single scan's time goes, p50 ms (the service's own timings_ms; other = rename -> PUBACK "
        "minus those: inbox detection, journal, outcome, MQTT hand-over and PUBACK)"
    )
    head = f"{'input':30s} {'side':11s} " + " ".join(f"{k[:7]:>7s}" for k in (*STAGES, "other"))
    rule(head)
    for key, row in out.items():
        for which, label in (("service", "service"), ("service_no_reports", "no-reports")):
            s = row[f"{which}_stage_p50_ms"]
            name = KIND[key].label if which == "service" else ""
            say(f"{name:30s} {label:11s} " + " ".join(f"{s[k]:7.1f}" for k in (*STAGES, "other")))


def print_backends(out: dict[str, Any], cpu: dict[str, Any]) -> None:
    say(
        f"\nbackends, batch 1 (CPU {cpu['model']}; "
        f"INT8 features: {', '.join(cpu['int8_features']) or 'none'}; u8 x s8 dot: {cpu['int8_dot']})"
    )
    head = f"{'backend':14s} {'threads':>7s} {'runs':>5s} {'p50 ms':>8s} {'p95 ms':>8s}"
    rule(head)
    for row in out["rows"].values():
        say(
            f"{row['backend']:14s} {row['threads']:7d} {row['runs']:5d} "
            f"{row['p50_ms']:8.2f} {row['p95_ms']:8.2f}"
        )
    for label, why in out["skipped"].items():
        say(f"{label:14s} skipped: {why}")


def print_scale(out: dict[str, Any]) -> None:
    cold = out["cold_start"]
    say("\ncold start of edge-runtime run (exec of python -m edge_runtime.cli run; page cache warm), s")
    say(
        f"  python + imports only (exec -> exit of 'import edge_runtime.cli, edge_runtime.service') "
        f"{cold['imports_only_s']:.2f}\n"
        f"  first log line (model loaded and conformance-checked) {cold['first_log_s']:.2f}   'starting' "
        f"{cold['starting_log_s']:.2f}   online status {cold['online_s']:.2f}   first result "
        f"{cold['first_result_s']:.2f} (pre-dropped scan; includes Inbox.SettleSeconds "
        f"{cold['settle_s']:.1f})"
    )
    sc = out["scale"]
    say(f"\nscale: {out['n']} JPEGs renamed into the inbox at once (results timed at a real MQTT subscriber)")
    say(
        f"  drained in {sc['drain_s']:.2f} s = {sc['scans_per_s']:.1f} scans/s; latency p50 "
        f"{sc['latency_ms']['p50']:.0f} ms, p95 {sc['latency_ms']['p95']:.0f} ms, "
        f"max {sc['latency_ms']['max']:.0f} ms"
    )
    say(f"  {'position (decile)':18s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for d in sc["deciles"]:
        say(f"  {d['decile']:18d} {d['p50_ms']:8.0f} {d['p95_ms']:8.0f} {d['max_ms']:8.0f}")
    m = sc["memory_peak"]
    say(
        f"  memory during the drop (service + decoder children, {m.get('processes', 0)} processes): peak "
        f"sum RSS {m.get('rss_mb', float('nan')):.0f} MB, sum PSS {m.get('pss_mb', float('nan')):.0f} MB"
    )
    if "large_kinds_memory_peak" in out:
        m = out["large_kinds_memory_peak"]
        say(
            f"  with large images ({', '.join(out['large_kinds'])}): peak sum RSS {m['rss_mb']:.0f} MB, "
            f"sum PSS {m['pss_mb']:.0f} MB"
        )
    m = out["memory_peak_overall"]
    say(
        f"  whole life: peak sum RSS {m['rss_mb']:.0f} MB, sum PSS {m['pss_mb']:.0f} MB, sum of VmHWM "
        f"{m['hwm_sum_mb']:.0f} MB ({out['memory_method']})"
    )
    for key, prof in (out.get("profiles") or {}).items():
        if not isinstance(prof, dict) or "self" not in prof:
            continue
        say(
            f"\nprofile of the service during a {prof['n']}-scan {key} drop "
            f"(py-spy, {prof['samples']} samples at 100 Hz, all processes; "
            f"{prof['scans_per_s_under_py_spy']:.1f} scans/s while sampled): "
            f"{prof['file']}"
        )
        say("  samples by thread: " + ", ".join(f"{t} {c}" for t, c in prof["threads"]))
        say(f"  {'self samples':>12s}  function")
        for name, count in prof["self"][:14]:
            say(f"  {count:12d}  {name}")
        say(f"  {'inclusive':>12s}  function")
        for name, count in prof["inclusive"][:18]:
            say(f"  {count:12d}  {name}")


def print_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(text: str, value: float, limit: float, higher_is_better: bool, shown: str) -> None:
        ok = value >= limit if higher_is_better else value <= limit
        checks.append({"target": text, "value": value, "limit": limit, "met": bool(ok)})
        say(f"  {'MET   ' if ok else 'MISSED'}  {text:58s} {shown}")

    say("\ntargets (issue #16)")
    for key, row in (results.get("throughput") or {}).items():
        check(
            f"throughput {key}: service / floor >= {TARGET_RATIO:.2f}",
            row["ratio"],
            TARGET_RATIO,
            True,
            f"{row['ratio']:.2f} (reports off: {row['ratio_no_reports']:.2f}; "
            f"against the floor with reports: {row['ratio_vs_floor_reports']:.2f})",
        )
    for key, row in (results.get("latency") or {}).items():
        check(
            f"single scan {key}: p95 <= {TARGET_P95} x floor p95",
            row["ratio_p95"],
            TARGET_P95,
            False,
            f"{row['ratio_p95']:.2f} x ({row['service_p95']:.1f} vs {row['floor_p95']:.1f} ms; "
            f"reports off {row['ratio_p95_no_reports']:.2f} x)",
        )
    scale = results.get("scale")
    if scale:
        online = scale["cold_start"]["online_s"]
        check(
            f"cold start: exec -> online <= {TARGET_COLD_S:.0f} s",
            online,
            TARGET_COLD_S,
            False,
            f"{online:.2f} s (first result {scale['cold_start']['first_result_s']:.2f} s)",
        )
        peak = scale["memory_peak_overall"]["rss_mb"]
        check(
            f"peak RSS service + decoder children <= {TARGET_RSS_MB:.0f} MB",
            peak,
            TARGET_RSS_MB,
            False,
            f"{peak:.0f} MB sum RSS (PSS {scale['memory_peak_overall']['pss_mb']:.0f} MB)",
        )
    return checks
