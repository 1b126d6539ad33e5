"""Per-site drift monitoring: are this site's recent scans still like the model's validation images?

A model validated on one population can quietly stop fitting a site: a new detector, a new
ward sending portable AP films, a referrer sending the wrong body part, an outbreak changing
who is scanned. No single scan shows it; the distribution of many does. Following CheXstray
(Soin et al., arXiv 2202.02833), the monitor compares a *detection window* of recent scans with
a *reference* feature by feature and combines the distances into one state:

* the share of scans outside the model's intended use (intake refusals and OOD verdicts);
* the out-of-distribution score's distribution (every scan that has one, in scope or not);
* the distribution of P(positive), over assessed scans only (a scan outside the intended use
  carries no decision, so it must not move the model's output statistics);
* each header field (modality, view, manufacturer, ...), one distribution per field.

The reference is the bundle's :class:`~edge_runtime.manifest.DriftReference`, measured on
validation. Header fields it lacks (training images were often JPEGs with no header) are
compared with the site's own *baseline*: the first ``window_scans`` scans this box ever saw,
frozen once full. That catches a change at the site (a detector replaced), not a site that was
unlike validation from day one; the OOD score covers that.

Distance: the population stability index, ``PSI = sum((a - e) * ln(a / e))`` over bins, with the
usual rule of thumb from credit-scorecard monitoring: below 0.1 stable, 0.1 to 0.25 *watch*,
above 0.25 *alarm*. PSI is computed on counts with half a scan added to every bin on both sides (the
Jeffreys pseudo-count), so an empty bin is finite and a value never seen in the reference still
weighs heavily when it is common now (not the usual ``1e-4`` floor on shares: that turns one
empty decile of a 50-scan window into a PSI of 0.7 on its own).

Noise: on ``n`` scans PSI is never zero even without drift; ``n_eff * PSI`` follows a chi-square
law with ``bins - 1`` degrees of freedom under no drift (``n_eff = n*m/(n+m)`` for windows of
``n`` and ``m``), so 10 deciles on 200 scans average 0.05 by chance alone and 50 scans 0.18. A
level therefore counts only where it is also significant at ``DriftSettings.significance``; the
outside share likewise must exceed validation's rate by a one-sided binomial test. The monitor
looks after every scan, so the default level is strict (1 in 1000); even so, overlapping windows
looked at again and again let a stable site show a short *watch* now and then, while an alarm
(PSI 0.25, or a fifth of scans outside) is far beyond what chance gives on 50 scans or more.

Combination: CheXstray weights and sums the per-feature statistics; here the state is the worst
level of any feature, each named in ``reasons``, because the reader is an IT admin who must know
*what* changed to act (call the PACS team, check a modality's export settings).

Two windows: the last ``window_scans`` scans react equally fast at a busy and at a quiet site;
the last ``window_hours`` hours age, so a morning of wrong scans clears by itself and
:meth:`DriftMonitor.report` answers between scans. The module is pure (no threads, no I/O): the
caller persists :meth:`DriftMonitor.to_state` so a restart keeps its windows and baseline.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from statistics import NormalDist
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .manifest import DriftReference, Histogram

__all__ = [
    "PSEUDO_COUNT",
    "STATE_FORMAT",
    "DriftMonitor",
    "DriftReport",
    "DriftSettings",
    "Observation",
    "Validation",
    "WindowReport",
    "population_stability_index",
]

#: Added to every bin's count on both sides before PSI (Jeffreys prior): keeps empty bins finite.
PSEUDO_COUNT = 0.5
#: What :meth:`DriftMonitor.to_state` writes; :meth:`DriftMonitor.from_state` reads only this.
STATE_FORMAT = "healthdiag.drift-state/1"
#: The category of a header field a scan does not carry (compared with the site's baseline only).
UNKNOWN = "(unknown)"

State = Literal["warming-up", "ok", "watch", "alarm"]
Level = Literal["ok", "watch", "alarm"]
_RANK: dict[str, int] = {"warming-up": 0, "ok": 1, "watch": 2, "alarm": 3}


@dataclass(frozen=True)
class Observation:
    """One analysed (or refused) scan, as the monitor needs it: no identifier, nothing to trace back."""

    #: Unix seconds when the box analysed (or refused) the scan; not the study date: a backlog of
    #: old studies sent today is today's traffic.
    at: float
    #: Inside the model's intended use (header and OOD checks passed).
    within: bool
    #: None: the model has no OOD check, or it did not run (refused on its header).
    ood_score: float | None = None
    #: P(positive); None when not computed.
    probability: float | None = None
    #: The decision; None when not assessed (outside the intended use).
    positive: bool | None = None
    #: Header facts, already coarse and non-identifying (``modality``, ``view``, ``manufacturer``,
    #: ``photometric``, ``pixel_spacing`` as "0.1-0.2 mm"); an absent key is unknown.
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise ValueError("an observation's time 'at' must be finite unix seconds")
        if self.ood_score is not None and not math.isfinite(self.ood_score):
            raise ValueError("an observation's ood_score must be finite or None")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability!r} is not in [0, 1]")
        # A caller's dict changed later must not change a window already judged.
        object.__setattr__(
            self, "metadata", MappingProxyType({str(k): str(v) for k, v in self.metadata.items()})
        )

    @property
    def assessed(self) -> bool:
        """Counts for the model's output statistics: in scope and scored."""
        return self.within and self.probability is not None


@dataclass(frozen=True)
class DriftSettings:
    """How much evidence the monitor wants before it speaks, and how loud.

    The defaults: 200 scans is about a week at a small site and a day at a large one, and
    enough for a 10-bin PSI of 0.15 to stand out from noise; 24 hours holds a whole day's mix
    of wards and shifts. Below 50 scans one scan moves a share by 2% and chance alone gives a
    10-bin PSI of 0.18 on average, so nothing could be told from noise. PSI 0.1/0.25 is the
    usual rule of thumb (see the module docstring); 10% and 20% outside the intended use are
    several times a validation set's usual 2-5% (the OOD threshold's own rate), and 20% means
    one scan in five gets no answer, which an admin should hear about.
    """

    window_scans: int = 200
    window_hours: float = 24.0
    #: Below this a window is "warming-up" and raises nothing (too few scans to tell from noise).
    min_scans: int = 50
    #: Population stability index: 0.1 watch, 0.25 alarm (the usual rule of thumb).
    psi_watch: float = 0.1
    psi_alarm: float = 0.25
    #: Share of scans outside the intended use that raises watch / alarm.
    outside_share_watch: float = 0.1
    outside_share_alarm: float = 0.2
    #: A level counts only if sampling noise would reach it less often than this (per look).
    significance: float = 0.001
    #: Most scans kept for the hours window (bounds memory and the state file at a busy site).
    max_kept_scans: int = 5000

    def __post_init__(self) -> None:
        problems = []
        if self.window_scans < 1 or self.min_scans < 1:
            problems.append("window_scans and min_scans must be at least 1")
        if self.min_scans > self.window_scans:
            problems.append("min_scans cannot exceed window_scans (the scans window would never judge)")
        if not self.window_hours > 0:
            problems.append("window_hours must be positive")
        if not 0 < self.psi_watch <= self.psi_alarm:
            problems.append("0 < psi_watch <= psi_alarm")
        if not 0 < self.outside_share_watch <= self.outside_share_alarm <= 1:
            problems.append("0 < outside_share_watch <= outside_share_alarm <= 1")
        if not 0 < self.significance < 1:
            problems.append("significance is a probability in (0, 1)")
        if self.max_kept_scans < self.window_scans:
            problems.append("max_kept_scans must hold at least window_scans scans")
        if problems:
            raise ValueError("invalid drift settings: " + "; ".join(problems))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WindowReport(_Frozen):
    """One rolling window's figures and verdict."""

    window: Literal["scans", "hours"]
    #: The window's size: scans (``scans``) or hours (``hours``).
    limit: float
    state: State
    n: int = Field(ge=0)
    #: Unix seconds of the window's first and last scan (None: empty).
    since: float | None
    until: float | None
    outside_share: float | None
    #: Scans in scope with a probability (what ``positive_share`` and ``psi_probability`` count).
    assessed: int = Field(ge=0)
    positive_share: float | None
    mean_probability: float | None
    #: None: no reference histogram, or too few scans to compare.
    psi_probability: float | None
    psi_ood_score: float | None
    #: Header field -> PSI against ``metadata_against[field]``.
    metadata_psi: dict[str, float]
    metadata_against: dict[str, Literal["validation", "site-baseline"]]


class Validation(_Frozen):
    """The reference's headline figures, so a report reads without the bundle at hand."""

    images: int
    outside_share: float
    positive_share: float
    mean_probability: float


class DriftReport(_Frozen):
    """The monitor's verdict at one moment; its JSON form goes to the health file and status."""

    state: State
    #: Plain English, worst first; empty when all is well.
    reasons: tuple[str, ...]
    #: Unix seconds the report describes.
    at: float
    scans: WindowReport
    hours: WindowReport
    #: None: the model bundle carries no drift reference.
    validation: Validation | None
    #: Scans in the site's own header baseline (frozen once it reaches ``window_scans``).
    baseline_scans: int
    baseline_frozen: bool
    #: Scans a window needs before it judges (``DriftSettings.min_scans``).
    min_scans: int

    def summary(self) -> str:
        """One paragraph for ``edge-runtime health`` and an admin's e-mail: the verdict first."""
        if self.state == "warming-up":
            parts = [
                f"Drift monitoring is warming up: {self.scans.n} scan(s) so far; it judges from "
                f"{self.min_scans} scans on."
            ]
        else:
            parts = [f"Drift monitoring: {self.state.upper()}."]
            parts += [reason if reason.endswith(".") else reason + "." for reason in self.reasons]
        for window in (self.scans, self.hours):
            if window.n:
                parts.append(_window_sentence(window))
        if self.validation is None:
            parts.append(
                "The model bundle carries no validation reference, so only the share outside the "
                "intended use and header changes against this site's first scans are checked."
            )
        else:
            v = self.validation
            parts.append(
                f"Validation ({v.images} images): {_pct(v.outside_share)} outside the intended use, "
                f"{_pct(v.positive_share)} positive, mean P(positive) {v.mean_probability:.2f}."
            )
        if not self.baseline_frozen:
            parts.append(f"This site's header baseline is still filling ({self.baseline_scans} scans).")
        return " ".join(parts)

    def to_json(self) -> str:
        return self.model_dump_json()


def population_stability_index(reference: Sequence[float], window: Sequence[float]) -> float:
    """PSI of ``window`` counts against ``reference`` counts, bin by bin (same order and length).

    Both are counts (a reference's shares times its image count), so the Jeffreys pseudo-count
    (:data:`PSEUDO_COUNT`) means the same on both sides: half an image per bin.
    """
    ref = np.asarray(reference, dtype=np.float64) + PSEUDO_COUNT
    now = np.asarray(window, dtype=np.float64) + PSEUDO_COUNT
    if ref.shape != now.shape or ref.ndim != 1:
        raise ValueError("PSI compares two count vectors of the same length")
    e = ref / ref.sum()
    a = now / now.sum()
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class _Finding:
    check: str
    level: Level
    text: str


class DriftMonitor:
    """Rolling windows over this site's scans, judged against the bundle's reference.

    Not thread-safe, by design: one caller (the flow, after a scan's outcome is recorded) feeds
    it; a reader wanting a report between scans goes through that caller.
    """

    def __init__(self, reference: DriftReference | None, settings: DriftSettings | None = None) -> None:
        self.reference = reference
        self.settings = DriftSettings() if settings is None else settings
        self._kept: deque[Observation] = deque()
        self._baseline_n = 0
        self._baseline: dict[str, Counter[str]] = {}
        self._latest: float | None = None
        self._ref_metadata: dict[str, dict[str, float]] = (
            {f: dict(v) for f, v in reference.metadata.items() if v} if reference is not None else {}
        )

    # -- feeding --------------------------------------------------------------------------
    def observe(self, obs: Observation) -> DriftReport:
        """Add one scan and judge the windows as they now stand (``now`` is the scan's time)."""
        if self._baseline_n < self.settings.window_scans:
            self._baseline_n += 1
            for key, value in obs.metadata.items():
                self._baseline.setdefault(key, Counter())[value] += 1
        self._kept.append(obs)
        self._latest = obs.at if self._latest is None else max(self._latest, obs.at)
        self._prune(obs.at)
        return self.report(obs.at)

    def _prune(self, now: float) -> None:
        cutoff = now - self.settings.window_hours * 3600.0
        kept, s = self._kept, self.settings
        while kept and (
            len(kept) > s.max_kept_scans or (len(kept) > s.window_scans and kept[0].at <= cutoff)
        ):
            kept.popleft()

    # -- judging --------------------------------------------------------------------------
    def report(self, now: float) -> DriftReport:
        """The state at ``now`` without a new scan: the hours window drops what has aged out."""
        s = self.settings
        kept = list(self._kept)
        by_scans = kept[-s.window_scans :]
        cutoff = now - s.window_hours * 3600.0
        by_hours = [o for o in kept if cutoff < o.at]
        scans, scan_findings = self._judge("scans", float(s.window_scans), by_scans)
        hours, hour_findings = self._judge("hours", s.window_hours, by_hours)
        judged = [w for w in (scans, hours) if w.state != "warming-up"]
        state: State = max((w.state for w in judged), key=_RANK.__getitem__) if judged else "warming-up"
        best: dict[str, _Finding] = {}
        for finding in scan_findings + hour_findings:  # the scans window's wording wins a tie
            if finding.check not in best or _RANK[finding.level] > _RANK[best[finding.check].level]:
                best[finding.check] = finding
        reasons = [f.text for f in sorted(best.values(), key=lambda f: -_RANK[f.level])]
        if state == "warming-up":
            reasons = [
                f"Too few scans to judge drift: {scans.n} in the scans window and {hours.n} in the last "
                f"{_hours(s.window_hours)}; the monitor judges from {s.min_scans} scans on."
            ]
        ref = self.reference
        validation = (
            None
            if ref is None
            else Validation(
                images=ref.images,
                outside_share=ref.outside_share,
                positive_share=ref.positive_share,
                mean_probability=ref.mean_probability,
            )
        )
        return DriftReport(
            state=state,
            reasons=tuple(reasons),
            at=now,
            scans=scans,
            hours=hours,
            validation=validation,
            baseline_scans=self._baseline_n,
            baseline_frozen=self._baseline_n >= s.window_scans,
            min_scans=s.min_scans,
        )

    def _judge(
        self, kind: Literal["scans", "hours"], limit: float, window: Sequence[Observation]
    ) -> tuple[WindowReport, list[_Finding]]:
        s, ref = self.settings, self.reference
        n = len(window)
        where = f"the last {n} scans" if kind == "scans" else f"the {n} scans of the last {_hours(limit)}"
        warming = n < s.min_scans
        findings: list[_Finding] = []

        outside = sum(1 for o in window if not o.within)
        outside_share = outside / n if n else None
        if outside_share is not None and not warming:
            level = self._outside_level(outside, n)
            if level != "ok":
                against = (
                    f"validation: {_pct(ref.outside_share)}"
                    if ref is not None
                    else "the model bundle has no validation figure"
                )
                findings.append(
                    _Finding(
                        "outside",
                        level,
                        f"{level.capitalize()}: {_pct(outside_share)} of {where} were outside the model's "
                        f"intended use ({against}; watch at {_pct(s.outside_share_watch)}, alarm at "
                        f"{_pct(s.outside_share_alarm)}).",
                    )
                )

        assessed = [o for o in window if o.assessed]
        probabilities = np.array([o.probability for o in assessed], dtype=np.float64)
        decided = [o.positive for o in window if o.within and o.positive is not None]
        positive_share = sum(decided) / len(decided) if decided else None
        mean_probability = float(probabilities.mean()) if len(probabilities) else None
        psi_probability = None
        if ref is not None and len(probabilities) >= s.min_scans:
            psi_probability, level, counts = self._histogram_psi(ref.probability, ref.images, probabilities)
            if level != "ok":
                findings.append(
                    _Finding(
                        "probability",
                        level,
                        f"{level.capitalize()}: the model's P(positive) over the {len(probabilities)} "
                        f"assessed scans among {where} differs from validation (PSI {psi_probability:.2f}; "
                        f"{self._psi_limits()}): {_pct(positive_share or 0.0)} called positive "
                        f"(validation {_pct(ref.positive_share)}), mean P(positive) "
                        f"{mean_probability or 0.0:.2f} (validation {ref.mean_probability:.2f}).",
                    )
                )

        scores = np.array([o.ood_score for o in window if o.ood_score is not None], dtype=np.float64)
        psi_ood = None
        if ref is not None and ref.ood_score is not None and len(scores) >= s.min_scans:
            psi_ood, level, counts = self._histogram_psi(ref.ood_score, ref.images, scores)
            if level != "ok":
                top_now, top_ref = counts[-1] / len(scores), ref.ood_score.shares[-1]
                findings.append(
                    _Finding(
                        "ood_score",
                        level,
                        f"{level.capitalize()}: the out-of-distribution scores of {where} differ from "
                        f"validation (PSI {psi_ood:.2f}; {self._psi_limits()}): {_pct(top_now)} fall in "
                        f"validation's top score bin (validation {_pct(top_ref)}), so scans look less "
                        f"like the images the model was validated on.",
                    )
                )

        metadata_psi: dict[str, float] = {}
        metadata_against: dict[str, Literal["validation", "site-baseline"]] = {}
        if not warming:
            fields = set(self._ref_metadata) | set(self._baseline) | {k for o in window for k in o.metadata}
            for name in sorted(fields):
                finding = self._metadata(name, window, where, metadata_psi, metadata_against)
                if finding is not None:
                    findings.append(finding)

        times = [o.at for o in window]
        report = WindowReport(
            window=kind,
            limit=limit,
            state="warming-up"
            if warming
            else max((f.level for f in findings), key=_RANK.__getitem__, default="ok"),
            n=n,
            since=min(times) if times else None,
            until=max(times) if times else None,
            outside_share=outside_share,
            assessed=len(assessed),
            positive_share=positive_share,
            mean_probability=mean_probability,
            psi_probability=psi_probability,
            psi_ood_score=psi_ood,
            metadata_psi=metadata_psi,
            metadata_against=metadata_against,
        )
        return report, findings

    def _metadata(
        self,
        name: str,
        window: Sequence[Observation],
        where: str,
        psi_out: dict[str, float],
        against_out: dict[str, Literal["validation", "site-baseline"]],
    ) -> _Finding | None:
        """One header field against validation where it has the field, else the site's baseline."""
        s, ref = self.settings, self.reference
        seen = Counter(o.metadata[name] for o in window if name in o.metadata)
        if name in self._ref_metadata and ref is not None:
            shares = self._ref_metadata[name]
            base = {value: share * ref.images for value, share in shares.items()}
            n = sum(seen.values())  # validation's shares are of images that had the field
            against: Literal["validation", "site-baseline"] = "validation"
            described = "validation"
        else:
            if self._baseline_n < s.window_scans:
                return None  # the baseline is still filling, and overlaps the window
            counts = self._baseline.get(name, Counter())
            base = {value: float(c) for value, c in counts.items()}
            base[UNKNOWN] = float(self._baseline_n - sum(counts.values()))
            n = len(window)
            seen[UNKNOWN] = n - sum(seen.values())
            against = "site-baseline"
            described = f"this site's first {self._baseline_n} scans"
        if n < s.min_scans:
            return None
        values = sorted(v for v in set(base) | set(seen) if base.get(v, 0) > 0 or seen.get(v, 0) > 0)
        psi = population_stability_index([base.get(v, 0.0) for v in values], [seen.get(v, 0) for v in values])
        psi_out[name], against_out[name] = psi, against
        level = self._psi_level(psi, n, sum(base.values()), len(values))
        if level == "ok":
            return None
        value, now_share, then_share = _largest_change(values, base, seen)
        note = "" if against == "validation" else "; the model bundle has no header reference for it"
        then = "validation" if against == "validation" else "before"
        return _Finding(
            f"metadata:{name}",
            level,
            f"{level.capitalize()}: header field '{name}' in {where} differs from {described} "
            f"(PSI {psi:.2f}; {self._psi_limits()}{note}): the largest change is '{value}', "
            f"{_pct(now_share)} of scans now ({then} {_pct(then_share)}).",
        )

    def _histogram_psi(
        self, histogram: Histogram, images: int, values: np.ndarray
    ) -> tuple[float, Level, np.ndarray]:
        """PSI of ``values`` against a reference histogram; its bins have open ends."""
        inner = np.asarray(histogram.edges[1:-1], dtype=np.float64)
        counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(histogram.shares))
        reference = np.asarray(histogram.shares, dtype=np.float64) * images
        psi = population_stability_index(reference.tolist(), counts.tolist())
        return psi, self._psi_level(psi, len(values), float(images), len(histogram.shares)), counts

    def _psi_level(self, psi: float, n: float, m: float, bins: int) -> Level:
        """The rule-of-thumb level, where sampling noise on these sizes could not explain it."""
        s = self.settings
        if psi < s.psi_watch or bins < 2:
            return "ok"
        n_eff = n * m / (n + m)
        if n_eff * psi < _chi2_quantile(bins - 1, 1.0 - s.significance):
            return "ok"
        return "alarm" if psi >= s.psi_alarm else "watch"

    def _outside_level(self, outside: int, n: int) -> Level:
        """The share's level, where validation's own rate could not produce it by chance."""
        s = self.settings
        share = outside / n
        if share < s.outside_share_watch:
            return "ok"
        if self.reference is not None and _binomial_upper_tail(outside, n, self.reference.outside_share) >= (
            s.significance
        ):
            return "ok"
        return "alarm" if share >= s.outside_share_alarm else "watch"

    def _psi_limits(self) -> str:
        return f"watch at {self.settings.psi_watch:.2f}, alarm at {self.settings.psi_alarm:.2f}"

    def reset_baseline(self) -> None:
        """Forget the site's header baseline; the next ``window_scans`` scans become the new one.

        For an admin who has checked a change and accepts it (a new detector is in service):
        a frozen baseline would otherwise keep the header alarm up for good. Fields the
        validation reference covers are unaffected.
        """
        self._baseline_n = 0
        self._baseline = {}

    # -- persistence ----------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """A JSON-able copy of the windows and the baseline, for the caller to write durably."""
        return {
            "format": STATE_FORMAT,
            "reference": _fingerprint(self.reference),
            "observations": [
                {
                    "at": o.at,
                    "within": o.within,
                    "ood_score": o.ood_score,
                    "probability": o.probability,
                    "positive": o.positive,
                    "metadata": dict(o.metadata),
                }
                for o in self._kept
            ],
            "baseline": {
                "scans": self._baseline_n,
                "fields": {k: dict(v) for k, v in self._baseline.items()},
            },
        }

    @classmethod
    def from_state(
        cls, reference: DriftReference | None, settings: DriftSettings | None, state: Mapping[str, Any]
    ) -> DriftMonitor:
        """A monitor that goes on where :meth:`to_state` left off.

        When the bundle's reference differs from the one the state was built under (a new model),
        the windows are dropped (their scores came from the other model) and the site's header
        baseline is kept (it describes the site, not the model).

        Raises:
            ValueError: the state is not one :meth:`to_state` wrote; the message says to delete it.
        """
        try:
            saved = _SavedState.model_validate(state)
        except ValidationError as exc:
            raise ValueError(
                f"the drift monitor's saved state is unreadable ({exc.error_count()} problem(s), first: "
                f"{exc.errors()[0]['msg']}); delete the state file to start the windows afresh"
            ) from None
        monitor = cls(reference, settings)
        monitor._baseline_n = saved.baseline.scans
        monitor._baseline = {k: Counter(v) for k, v in saved.baseline.fields.items()}
        if saved.reference == _fingerprint(reference):
            monitor._extend(
                Observation(o.at, o.within, o.ood_score, o.probability, o.positive, o.metadata)
                for o in saved.observations
            )
        return monitor

    def _extend(self, observations: Iterable[Observation]) -> None:
        for obs in observations:
            self._kept.append(obs)
            self._latest = obs.at if self._latest is None else max(self._latest, obs.at)
        if self._latest is not None:
            self._prune(self._latest)


class _SavedObservation(_Frozen):
    at: float
    within: bool
    ood_score: float | None
    probability: float | None = Field(ge=0.0, le=1.0)
    positive: bool | None
    metadata: dict[str, str]


class _SavedBaseline(_Frozen):
    scans: int = Field(ge=0)
    fields: dict[str, dict[str, int]]


class _SavedState(_Frozen):
    format: Literal["healthdiag.drift-state/1"]
    reference: str | None
    observations: list[_SavedObservation]
    baseline: _SavedBaseline


def _fingerprint(reference: DriftReference | None) -> str | None:
    """Which reference a state was built under (a new model bundle brings another)."""
    if reference is None:
        return None
    return hashlib.sha256(reference.model_dump_json().encode()).hexdigest()


@lru_cache(maxsize=64)
def _chi2_quantile(df: int, q: float) -> float:
    """Chi-square quantile (Wilson-Hilferty; within a few % for df >= 1, on the safe side at df = 1)."""
    z = NormalDist().inv_cdf(q)
    k = 2.0 / (9.0 * df)
    return float(df * max(0.0, 1.0 - k + z * math.sqrt(k)) ** 3)


def _binomial_upper_tail(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p), summed exactly in log space (n is a window's size)."""
    if x <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    terms = [
        log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        for k in range(x, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _largest_change(
    values: Sequence[str], base: Mapping[str, float], seen: Mapping[str, float]
) -> tuple[str, float, float]:
    """The value that adds most to the PSI, with its share now and in the comparison.

    Naming it tells the admin where to look (a new manufacturer, a view gone missing); the
    most common value often has barely moved.
    """
    then_total, now_total = sum(base.values()) or 1.0, sum(seen.values()) or 1.0
    shares = [(v, seen.get(v, 0.0) / now_total, base.get(v, 0.0) / then_total) for v in values]
    ref = np.array([base.get(v, 0.0) for v in values]) + PSEUDO_COUNT
    now = np.array([seen.get(v, 0.0) for v in values]) + PSEUDO_COUNT
    e, a = ref / ref.sum(), now / now.sum()
    return shares[int(np.argmax((a - e) * np.log(a / e)))]


def _pct(share: float) -> str:
    percent = 100.0 * share
    return f"{percent:.1f}%" if 0 < percent < 10 else f"{percent:.0f}%"


def _hours(hours: float) -> str:
    return f"{hours:g} hours" if hours != 1 else "hour"


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _window_sentence(window: WindowReport) -> str:
    if window.window == "scans":
        head = f"Last {window.n} scans"
    else:
        head = f"Last {_hours(window.limit)}, {window.n} scans"
    span = (
        f" ({_utc(window.since)} to {_utc(window.until)})"
        if window.since is not None and window.until is not None
        else ""
    )
    figures = [f"{_pct(window.outside_share or 0.0)} outside the intended use"]
    if window.positive_share is not None:
        figures.append(f"{_pct(window.positive_share)} positive among {window.assessed} assessed")
    if window.mean_probability is not None:
        figures.append(f"mean P(positive) {window.mean_probability:.2f}")
    return f"{head}{span}: {', '.join(figures)}."
