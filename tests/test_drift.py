"""Drift monitoring (#26): a site's recent scans against the model's validation set and its own past.

The reference is built the way packaging builds it, from a synthetic validation set: 2,000 images,
OOD scores standardised and summed over stages (about normal, spread 1.8), the OOD threshold at
validation's 97.4th percentile, P(positive) from a 25%-prevalence mix of two beta laws, decile
bins. A site "like validation" draws from the same law with other seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest

from edge_runtime.drift import (
    PSEUDO_COUNT,
    DriftMonitor,
    DriftReport,
    DriftSettings,
    Observation,
    population_stability_index,
)
from edge_runtime.manifest import DriftReference, Histogram

T0 = 1_796_000_000.0  # 2026-11-29, unix seconds
FIVE_MINUTES = 300.0
SETTINGS = DriftSettings()


def _draw(rng: np.random.Generator, n: int, prevalence: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """OOD scores and P(positive) of ``n`` images like the validation set (at this prevalence)."""
    scores = rng.normal(0.0, 1.8, n)
    sick = rng.random(n) < prevalence
    probabilities = np.where(sick, rng.beta(6, 2, n), rng.beta(1.5, 9, n))
    return scores, probabilities


def _deciles(values: np.ndarray) -> Histogram:
    edges = np.quantile(values, np.linspace(0.0, 1.0, 11))
    counts = np.bincount(np.searchsorted(edges[1:-1], values, side="right"), minlength=10)
    return Histogram(edges=edges.tolist(), shares=(counts / counts.sum()).tolist())


def _validation(metadata: dict[str, dict[str, float]] | None = None) -> tuple[DriftReference, float]:
    """The reference ``training package`` would write, and the OOD threshold it implies."""
    scores, probabilities = _draw(np.random.default_rng(2026), 2000)
    threshold = float(np.quantile(scores, 0.974))
    within = scores <= threshold
    reference = DriftReference(
        images=2000,
        outside_share=float(1.0 - within.mean()),
        positive_share=float((probabilities[within] >= 0.5).mean()),
        mean_probability=float(probabilities[within].mean()),
        probability=_deciles(probabilities[within]),
        ood_score=_deciles(scores),
        metadata=metadata or {},
    )
    return reference, threshold


REFERENCE, THRESHOLD = _validation()


def _site(
    seed: int, n: int, start: float, every: float = FIVE_MINUTES, prevalence: float = 0.25
) -> list[Observation]:
    """Scans of a site like validation: two manufacturers, mostly PA views, every five minutes."""
    rng = np.random.default_rng(seed)
    scores, probabilities = _draw(rng, n, prevalence)
    makers = rng.choice(["Siemens", "Philips"], n, p=[0.6, 0.4])
    views = rng.choice(["PA", "AP"], n, p=[0.7, 0.3])
    scans = []
    for i in range(n):
        within = bool(scores[i] <= THRESHOLD)
        scans.append(
            Observation(
                at=start + i * every,
                within=within,
                ood_score=float(scores[i]),
                probability=float(probabilities[i]),  # computed in the same run, even when outside
                positive=bool(probabilities[i] >= 0.5) if within else None,
                metadata={"modality": "DX", "manufacturer": str(makers[i]), "view": str(views[i])},
            )
        )
    return scans


def _out_of_scope(seed: int, n: int, start: float, every: float = FIVE_MINUTES) -> list[Observation]:
    """Scans that are not chest radiographs to the model: far above the OOD threshold, no decision."""
    rng = np.random.default_rng(seed)
    return [
        Observation(
            at=start + i * every,
            within=False,
            ood_score=float(rng.normal(12.0, 3.0)),
            probability=None,
            positive=None,
            metadata={"modality": "DX", "manufacturer": "Siemens", "view": "PA"},
        )
        for i in range(n)
    ]


def _feed(monitor: DriftMonitor, scans: list[Observation]) -> list[DriftReport]:
    return [monitor.observe(scan) for scan in scans]


def _first(reports: list[DriftReport], state: str) -> int | None:
    """1-based number of scans until a report first says ``state``."""
    return next((i for i, r in enumerate(reports, 1) if r.state == state), None)


def test_psi_is_the_textbook_formula_with_half_a_scan_per_bin() -> None:
    """Large counts give the textbook PSI; an empty bin is finite and weighs what half a scan would."""
    reference, window = [5000, 3000, 2000], [2000, 3000, 5000]
    textbook = sum((a - e) * math.log(a / e) for a, e in zip([0.2, 0.3, 0.5], [0.5, 0.3, 0.2], strict=True))
    assert population_stability_index(reference, window) == pytest.approx(textbook, abs=1e-3)
    assert textbook == pytest.approx(0.5498, abs=1e-4)

    empty = population_stability_index([100, 100], [50, 0])  # one bin never seen in the window
    a = np.array([50 + PSEUDO_COUNT, PSEUDO_COUNT]) / (50 + 2 * PSEUDO_COUNT)
    assert empty == pytest.approx(float(np.sum((a - 0.5) * np.log(a / 0.5))))
    floored = 0.5 * math.log(1.0 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)  # shares floored at 1e-4
    assert 2.0 < empty < floored / 2  # large, but half of what a 1e-4 floor says about 50 scans
    assert population_stability_index([10, 20, 30], [10, 20, 30]) == 0.0


def test_scans_like_validation_warm_up_then_stay_ok_and_never_alarm() -> None:
    """1,500 scans (about five days at one every five minutes) from validation's own law.

    Watch may flicker by chance: each of eight checks (four features, two windows) is looked at
    after every scan at a 1-in-1000 level, and overlapping windows make runs; alarm needs PSI 0.25
    (noise on 200 scans averages 0.05) or a fifth of scans outside, and must never come.
    """
    monitor = DriftMonitor(REFERENCE)
    reports = _feed(monitor, _site(1, 1500, T0))
    states = Counter(r.state for r in reports)
    assert [r.state for r in reports[: SETTINGS.min_scans - 1]] == ["warming-up"] * (SETTINGS.min_scans - 1)
    assert reports[SETTINGS.min_scans - 1].state == "ok"
    assert states["alarm"] == 0, [r.reasons for r in reports if r.state == "alarm"][:1]
    assert states["watch"] <= 0.01 * len(reports), states
    last = reports[-1]
    assert last.state == "ok" and last.reasons == ()
    assert last.scans.n == 200 and last.hours.n == 288  # 24 h of one scan every 5 minutes
    assert abs(last.scans.outside_share - REFERENCE.outside_share) < 0.04  # type: ignore[operator]
    assert abs(last.scans.positive_share - REFERENCE.positive_share) < 0.08  # type: ignore[operator]
    assert last.scans.psi_probability is not None and last.scans.psi_probability < SETTINGS.psi_watch
    assert last.scans.psi_ood_score is not None and last.scans.psi_ood_score < SETTINGS.psi_watch
    assert last.baseline_frozen and last.scans.metadata_against == {
        "manufacturer": "site-baseline",
        "modality": "site-baseline",
        "view": "site-baseline",
    }
    assert max(last.scans.metadata_psi.values()) < SETTINGS.psi_watch


def test_out_of_scope_scans_raise_the_alarm_within_40_scans() -> None:
    """A referrer starts sending images the model was not made for, one after another.

    Bound: 40 such scans are 20% of the last 200 whatever the window held before, and 20% is
    ``outside_share_alarm``; the binomial test against validation's 2.6% passes long before
    (P(X >= 40 of 200) < 1e-14). Fewer suffice when the window already held some.
    """
    monitor = DriftMonitor(REFERENCE)
    before = _feed(monitor, _site(2, 300, T0))
    assert before[-1].state == "ok"
    reports = _feed(monitor, _out_of_scope(3, 60, T0 + 300 * FIVE_MINUTES))
    to_watch, to_alarm = _first(reports, "watch"), _first(reports, "alarm")
    assert to_watch is not None and to_alarm is not None
    assert to_watch < to_alarm <= math.ceil(SETTINGS.outside_share_alarm * SETTINGS.window_scans) == 40
    assert to_watch <= 20  # 10% of 200
    alarm = reports[to_alarm - 1]
    assert alarm.scans.outside_share is not None and alarm.scans.outside_share >= 0.2
    assert (
        alarm.reasons[0].startswith("Alarm: ")
        and "of the last 200 scans were outside the model's " in (alarm.reasons[0])
    )
    assert "(validation: 2.6%;" in alarm.reasons[0]
    # They carry no decision: the P(positive) figures still count only the assessed scans.
    assert alarm.scans.assessed <= 200 - to_alarm
    # The OOD score's distribution sees them, all in validation's top bin.
    final = reports[-1]
    assert final.state == "alarm" and final.scans.psi_ood_score is not None
    assert final.scans.psi_ood_score >= SETTINGS.psi_alarm
    assert any("out-of-distribution scores" in reason for reason in final.reasons)


def test_a_shift_in_probability_alone_raises_psi() -> None:
    """Prevalence 25% -> 60% (an outbreak, or a model gone wrong): scans otherwise like validation."""
    monitor = DriftMonitor(REFERENCE)
    _feed(monitor, _site(4, 300, T0))
    reports = _feed(monitor, _site(5, 300, T0 + 300 * FIVE_MINUTES, prevalence=0.6))
    to_watch, to_alarm = _first(reports, "watch"), _first(reports, "alarm")
    assert to_watch is not None and to_alarm is not None and to_watch < to_alarm <= 200
    last = reports[-1]
    assert last.state == "alarm"
    assert last.scans.psi_probability is not None and last.scans.psi_probability >= SETTINGS.psi_alarm
    assert last.scans.positive_share is not None and last.scans.positive_share > 0.45
    assert len(last.reasons) == 1 and "P(positive)" in last.reasons[0]
    assert f"(validation {REFERENCE.positive_share:.0%})" in last.reasons[0]  # positive share on validation
    # Nothing else moved: the outside share and the OOD scores stay like validation.
    assert last.scans.psi_ood_score is not None and last.scans.psi_ood_score < SETTINGS.psi_watch
    assert last.scans.outside_share is not None and last.scans.outside_share < SETTINGS.outside_share_watch


def test_the_hours_window_drops_old_scans() -> None:
    """A morning of wrong scans clears from the 24-hour window a day later; the scans window keeps it."""
    monitor = DriftMonitor(REFERENCE)
    _feed(monitor, _site(5, 200, T0 - 3 * 86400))  # a healthy first week: the header baseline
    bad = _feed(monitor, _out_of_scope(6, 120, T0, every=60.0))
    assert bad[-1].state == "alarm" and bad[-1].hours.state == "alarm" and bad[-1].hours.n == 120
    last_bad = T0 + 119 * 60.0

    later = monitor.report(last_bad + 25 * 3600)  # no new scan: the hours window has aged
    assert later.hours.n == 0 and later.hours.state == "warming-up" and later.hours.since is None
    assert later.scans.n == 200 and later.state == "alarm"  # 80 healthy, then the 120 bad ones

    start = last_bad + 30 * 3600
    reports = _feed(monitor, _site(7, 80, start))
    now = reports[-1]
    assert now.hours.n == 80 and now.hours.since == start and now.hours.state == "ok"
    assert now.hours.outside_share is not None and now.hours.outside_share < 0.1
    assert now.scans.n == 200 and now.scans.state == "alarm"  # 120 of its 200 are still the bad ones
    assert all("the last 200 scans" in reason for reason in now.reasons)
    # Memory: a scan is kept while either window needs it, no longer (the state file stays small).
    more = _feed(monitor, _site(8, 100, start + 80 * FIVE_MINUTES))
    assert more[-1].hours.n == 180 and more[-1].scans.n == 200
    assert len(monitor.to_state()["observations"]) == 200  # 20 aged bad ones still in the scans window
    assert more[-1].scans.outside_share is not None and more[-1].scans.outside_share >= 0.1


def test_a_new_manufacturer_is_drift_against_the_sites_own_baseline() -> None:
    """The validation images had no header (JPEGs), so the site's first 200 scans are the baseline."""
    monitor = DriftMonitor(REFERENCE)
    first = _feed(monitor, _site(9, 250, T0))
    assert not first[198].baseline_frozen and first[199].baseline_frozen
    assert "manufacturer" not in first[198].scans.metadata_psi  # no comparison while it fills
    new_room = [
        dataclasses.replace(scan, metadata={**scan.metadata, "manufacturer": "Acme"})
        for scan in _site(10, 200, T0 + 250 * FIVE_MINUTES)
    ]
    reports = _feed(monitor, new_room)
    to_alarm = _first(reports, "alarm")
    # A value the baseline never had: a PSI of 0.25 with 7.5% of the window (a * ln(a / (0.5/201))).
    assert to_alarm is not None and to_alarm <= 20
    alarm = reports[to_alarm - 1]
    assert alarm.scans.metadata_against["manufacturer"] == "site-baseline"
    assert alarm.scans.metadata_psi["manufacturer"] >= SETTINGS.psi_alarm
    assert alarm.scans.metadata_psi["view"] < SETTINGS.psi_watch
    reason = alarm.reasons[0]
    assert "header field 'manufacturer'" in reason and "this site's first 200 scans" in reason
    assert "no header reference" in reason and "'Acme'" in reason and "(before 0%)" in reason
    assert reports[-1].scans.metadata_psi["manufacturer"] > 3  # the whole window is the new room

    monitor.reset_baseline()  # the admin checked: the new room is in service, accept it
    accepted = _feed(monitor, new_room[:60])
    assert accepted[-1].baseline_scans == 60 and "manufacturer" not in accepted[-1].scans.metadata_psi
    assert accepted[-1].state == "ok"


def test_a_header_field_validation_had_is_compared_with_validation() -> None:
    """Where the reference has the field, the site is held to validation, not to its own past."""
    reference, _ = _validation({"view": {"PA": 0.7, "AP": 0.3}})
    monitor = DriftMonitor(reference)
    ok = _feed(monitor, _site(11, 100, T0))
    assert ok[-1].state == "ok" and ok[-1].scans.metadata_against == {"view": "validation"}
    assert ok[-1].scans.metadata_psi["view"] < SETTINGS.psi_watch
    portable = [
        dataclasses.replace(s, metadata={**s.metadata, "view": "AP"}) for s in _site(12, 100, T0 + 1e5)
    ]
    last = _feed(monitor, portable)[-1]
    assert last.state == "alarm" and last.scans.metadata_against["view"] == "validation"
    assert last.scans.metadata_psi["view"] > SETTINGS.psi_alarm
    assert (
        "differs from validation" in last.reasons[0]
        and "'AP', 67% of scans now (validation 30%)" in (last.reasons[0])
    )


def test_state_round_trips_through_json_and_gives_the_same_reports() -> None:
    monitor = DriftMonitor(REFERENCE)
    _feed(monitor, _site(13, 260, T0) + _out_of_scope(14, 30, T0 + 260 * FIVE_MINUTES))
    text = json.dumps(monitor.to_state())
    restored = DriftMonitor.from_state(REFERENCE, SETTINGS, json.loads(text))
    now = T0 + 300 * FIVE_MINUTES
    assert restored.report(now) == monitor.report(now)
    assert monitor.report(now).state == "watch"  # something worth keeping across a restart
    tail = _out_of_scope(15, 20, now)
    assert _feed(restored, tail) == _feed(monitor, tail)
    assert monitor.report(now + 3600).to_json() == restored.report(now + 3600).to_json()
    assert DriftReport.model_validate_json(monitor.report(now).to_json()) == monitor.report(now)

    # A new model: its scores are not comparable, the site's header baseline still is.
    other, _ = _validation({"view": {"PA": 1.0}})
    fresh = DriftMonitor.from_state(other, SETTINGS, json.loads(text))
    assert fresh.report(now).scans.n == 0 and fresh.report(now).baseline_scans == 200

    with pytest.raises(ValueError, match="delete the state file"):
        DriftMonitor.from_state(REFERENCE, SETTINGS, {"format": "something-else/9"})


def test_without_a_reference_the_outside_share_and_headers_are_still_judged() -> None:
    monitor = DriftMonitor(None)
    before = _feed(monitor, _site(16, 220, T0))
    assert before[-1].state == "ok" and before[-1].validation is None
    assert before[-1].scans.psi_probability is None and before[-1].scans.psi_ood_score is None
    assert before[-1].scans.mean_probability is not None  # the figures are still reported
    reports = _feed(monitor, _out_of_scope(17, 50, T0 + 220 * FIVE_MINUTES))
    to_alarm = _first(reports, "alarm")
    assert to_alarm is not None and to_alarm <= 40
    assert "the model bundle has no validation figure" in reports[to_alarm - 1].reasons[0]
    assert "carries no validation reference" in reports[-1].summary()
    moved = [dataclasses.replace(s, metadata={"modality": "CR"}) for s in _site(18, 200, T0 + 1e6)]
    last = _feed(monitor, moved)[-1]
    assert last.scans.metadata_psi["modality"] > SETTINGS.psi_alarm
    assert last.scans.metadata_psi["manufacturer"] > SETTINGS.psi_alarm  # now unknown: a change too
    assert any("header field 'modality'" in reason for reason in last.reasons)


def test_the_summary_is_one_paragraph_an_admin_can_read() -> None:
    monitor = DriftMonitor(REFERENCE)
    warming = _feed(monitor, _site(19, 10, T0))[-1]
    assert warming.state == "warming-up"
    assert warming.summary().startswith(
        "Drift monitoring is warming up: 10 scan(s) so far; it judges from 50"
    )
    alarm = _feed(monitor, _site(20, 200, T0 + 1e4) + _out_of_scope(21, 45, T0 + 1e5))[-1]
    summary = alarm.summary()
    assert "\n" not in summary and summary.startswith("Drift monitoring: ALARM. Alarm: ")
    assert all(reason in summary for reason in alarm.reasons)
    assert (
        f"Validation (2000 images): 2.6% outside the intended use, {REFERENCE.positive_share:.0%} positive"
        in summary
    )
    assert "Last 200 scans (2026-" in summary and "UTC)" in summary
    assert json.loads(alarm.to_json())["state"] == "alarm"


def test_nonsense_settings_and_observations_are_refused() -> None:
    with pytest.raises(ValueError, match="psi_watch <= psi_alarm"):
        DriftSettings(psi_watch=0.3, psi_alarm=0.2)
    with pytest.raises(ValueError, match="min_scans cannot exceed window_scans"):
        DriftSettings(window_scans=20, min_scans=50)
    with pytest.raises(ValueError, match="not in"):
        Observation(at=T0, within=True, probability=1.5)
    metadata = {"view": "PA"}
    scan = Observation(at=T0, within=True, metadata=metadata)
    metadata["view"] = "AP"
    assert scan.metadata["view"] == "PA"  # a caller's dict changed later does not change a judged scan
