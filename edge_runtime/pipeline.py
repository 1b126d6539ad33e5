"""One scan through the stages: decode + preprocess (:mod:`.prepare`) -> backend -> result.

:class:`ScanAnalyzer` holds the loaded model and is shared by all workers
(ONNX Runtime sessions are thread-safe; each thread gets its own
preallocated input buffer). It knows nothing of inboxes, journals or MQTT,
so ``edge-runtime process FILE`` and the service use the very same code.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backend_choice import choose_backend
from .backends import AUTO_BACKEND, Backend
from .bundle import BundleTrust, ModelBundle, default_bundle_path, load_bundle, sha256_file
from .config import ReportsConfig, RuntimeConfig
from .conformance import ConformanceReport, enforce, open_checked
from .decode import DecodeLimits
from .files import ScanFile, display_name
from .intake import IntakePolicy, ScopeCheck
from .logs import event
from .prepare import PreparedScan, PrepareOptions, prepare_file
from .privacy import load_or_create_key, log_name, loggable_uid, scan_ref
from .reports.heatmap import positive_heat
from .results import (
    Analysis,
    ScanResult,
    analysis_of,
    input_identity,
    message_id,
    public_metadata,
    scores_to_probabilities,
)
from .sandbox import DecodeSandbox

__all__ = ["ScanAnalyzer", "ScanOutcome", "file_sha256"]

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """Content hash of an input file (the journal's identity for it)."""
    return sha256_file(path)


@dataclass(frozen=True)
class ScanOutcome:
    """What analysing one scan gave: the model's answer and what the reports are built from."""

    analysis: Analysis
    #: The scan's idempotency key (its input identity with the model): the result's ``message_id``
    #: unless the flow finds another image under its SOP Instance UID (see :mod:`.journal`).
    message_id: str
    #: :func:`~edge_runtime.reports.heatmap.positive_heat` of the model's class-activation map,
    #: ``(h, w)`` float32 in [0, 1] on the model's grid; None when the model has no heat-map output.
    heatmap: np.ndarray | None = None
    #: The decoded image as the overlay is drawn on it (2-D, [0, 1], longer side at most the
    #: ``preview_side`` asked for); None when ``heatmap`` is, or when no preview was asked for.
    image: np.ndarray | None = None
    #: For DICOM, the header bytes the decoder read (the reports are built from them, never
    #: from the file again); None for other images.
    header: bytes | None = field(default=None, repr=False)
    #: The header's Manufacturer, coarse (for drift monitoring only; never in a message).
    manufacturer: str | None = None

    def result(self, urgent_threshold: float | None = None) -> ScanResult:
        """The result of this scan on its own (``edge-runtime process``): its own id, no reports.

        The service's results are placed in their SOP Instance UID's history and carry
        their reports (:mod:`.flow`); a scan analysed on a workstation has neither.
        """
        return ScanResult.of(
            self.analysis,
            message_id=self.message_id,
            priority=self.analysis.urgency(urgent_threshold),
        )


class ScanAnalyzer:
    """Runs the model of one bundle on one file at a time (thread-safe)."""

    def __init__(
        self,
        bundle: ModelBundle,
        backend: Backend,
        *,
        limits: DecodeLimits | None = None,
        threshold: float | None = None,
        policy: IntakePolicy | None = None,
        scope: ScopeCheck | None = None,
        isolate: bool = False,
        decode_timeout_s: float = 30.0,
        decode_memory_mb: int = 2048,
    ) -> None:
        self.bundle = bundle
        self.policy = policy
        #: The intended-use verdict after inference (age range, OOD score); the bundle's by default.
        self.scope = scope or ScopeCheck.from_bundle(bundle, backend.name)
        self.isolate = isolate
        self.decode_timeout_s = decode_timeout_s
        self.decode_memory_mb = decode_memory_mb
        #: Decoder children shared by the worker threads (``Decode.Processes``); 0: one per worker.
        self.decode_processes = 0
        self._sandboxes: list[DecodeSandbox] = []
        self._idle_sandboxes: list[DecodeSandbox] = []
        self._sandbox_ready = threading.Condition()
        self.backend = backend
        self.limits = limits or DecodeLimits()
        self.threshold = bundle.threshold if threshold is None else threshold
        artifact = bundle.artifact(backend.name)
        self.model_info = {
            "name": bundle.name,
            "version": bundle.version,
            "sha256": artifact.sha256,
            "backend": backend.name,
            "quantization": artifact.quantization,
            "preprocessing_sha256": bundle.preprocessing.sha256,
        }
        self._local = threading.local()
        #: The heat-map preview's longer side when :meth:`analyze` is not told (Reports.HeatmapMaxSide).
        self.preview_side = ReportsConfig().heatmap_max_side
        self._has_heatmap = bundle.manifest.heatmap_output(backend.name) is not None
        #: The conformance check run when this model was loaded (None: the bundle has no set).
        self.conformance: ConformanceReport | None = None
        #: The box's scan-reference key (None: unkeyed references, outside the service).
        self.reference_key: bytes | None = None
        #: Results name the file itself (Privacy.PublishFileNames) instead of its reference.
        self.publish_file_names = False
        #: Why this engine runs the model (named in the configuration, or chosen by timing).
        self.backend_reason = f"given ({backend.name})"

    @classmethod
    def from_bundle_path(
        cls,
        path: str | Path,
        backend_name: str = "onnxruntime",
        *,
        threads: int = 1,
        limits: DecodeLimits | None = None,
        threshold: float | None = None,
        enforce_intended_use: bool = True,
        require_tags: bool = False,
        out_of_scope: str = "report",
        isolate: bool = False,
        decode_timeout_s: float = 30.0,
        decode_memory_mb: int = 2048,
        trust: BundleTrust | None = None,
    ) -> ScanAnalyzer:
        """Load, authenticate and conformance-check a bundle (``trust`` None: the configured trust).

        ``backend_name`` ``auto``: the fastest engine that passes the check here
        (:mod:`edge_runtime.backend_choice`).
        """
        bundle = load_bundle(path, trust=trust)
        if backend_name == AUTO_BACKEND:
            backend, conformance, timings = choose_backend(bundle, threads=threads, threshold=threshold)
            candidates = ", ".join(
                f"{t.name} {t.p50_ms:.2f} ms" if t.p50_ms is not None else f"{t.name} not usable here"
                for t in timings
            )
            reason = (
                f"Model.Backend auto: the fastest engine that passed the conformance check ({candidates})"
            )
        else:
            backend, conformance = open_checked(bundle, backend_name, threads=threads, threshold=threshold)
            reason = f"named in Model.Backend ({backend_name})"
        if conformance is None:
            log.warning(
                "model %s %s has no conformance reference set (bundles before 0.2.0): its "
                "answers on this CPU cannot be checked",
                bundle.name,
                bundle.version,
            )
        elif not conformance.passed:
            log.error("%s", conformance.explain())
            backend.close()
            enforce(conformance)
        else:
            event(log, "conformance", "%s", conformance.explain(), **conformance.summary())
        policy = None
        if enforce_intended_use:
            policy = IntakePolicy.from_intended_use(
                bundle.intended_use,
                model_name=f"model {bundle.name} {bundle.version}",
                require_tags=require_tags,
            )
        analyzer = cls(
            bundle,
            backend,
            limits=limits,
            threshold=threshold,
            policy=policy,
            scope=ScopeCheck.from_bundle(bundle, backend.name, out_of_scope=out_of_scope),
            isolate=isolate,
            decode_timeout_s=decode_timeout_s,
            decode_memory_mb=decode_memory_mb,
        )
        analyzer.conformance = conformance
        analyzer.backend_reason = reason
        return analyzer

    @classmethod
    def from_config(cls, config: RuntimeConfig, *, create_reference_key: bool = True) -> ScanAnalyzer:
        """The analyzer a configuration describes (loads and verifies the model bundle).

        ``create_reference_key`` False (``edge-runtime process``): use the box's
        reference key if it exists, never create one (unkeyed references then).
        """
        analyzer = cls.from_bundle_path(
            config.model.bundle_path or default_bundle_path(),
            config.model.backend,
            threads=config.model.threads,
            limits=DecodeLimits(max_pixels=config.decode.max_pixels),
            threshold=config.model.threshold,
            enforce_intended_use=config.intake.enforce_intended_use,
            require_tags=config.intake.require_tags,
            out_of_scope=config.intake.out_of_scope,
            isolate=config.decode.isolate,
            decode_timeout_s=config.decode.timeout_seconds,
            decode_memory_mb=config.decode.memory_limit_mb,
            trust=BundleTrust.from_config(config.model),
        )
        if create_reference_key or config.reference_key_path.is_file():
            analyzer.reference_key = load_or_create_key(config.reference_key_path)
        analyzer.publish_file_names = config.privacy.publish_file_names
        analyzer.decode_processes = config.decode.processes
        analyzer.preview_side = config.reports.heatmap_max_side if config.reports.heatmap else 0
        return analyzer

    def _checkout(self) -> DecodeSandbox:
        """A decoder child for this thread's next file: its own, or a free one of the shared few.

        With ``decode_processes`` set, at most that many children exist and a worker waits for a
        free one (each child decodes one file at a time); otherwise every worker thread has its own.
        """
        if self.decode_processes <= 0:
            sandbox: DecodeSandbox | None = getattr(self._local, "sandbox", None)
            if sandbox is None:
                sandbox = DecodeSandbox(self.decode_timeout_s, self.decode_memory_mb)
                self._local.sandbox = sandbox
                with self._sandbox_ready:
                    self._sandboxes.append(sandbox)
            return sandbox
        with self._sandbox_ready:
            while not self._idle_sandboxes and len(self._sandboxes) >= self.decode_processes:
                self._sandbox_ready.wait()
            if self._idle_sandboxes:
                return self._idle_sandboxes.pop()
            sandbox = DecodeSandbox(self.decode_timeout_s, self.decode_memory_mb)
            self._sandboxes.append(sandbox)
            return sandbox

    def _checkin(self, sandbox: DecodeSandbox) -> None:
        if self.decode_processes <= 0:
            return
        with self._sandbox_ready:
            self._idle_sandboxes.append(sandbox)
            self._sandbox_ready.notify()

    def warm_up(self) -> None:
        """Start this thread's (or a shared) decoder process before the first scan arrives."""
        if self.isolate:
            sandbox = self._checkout()
            try:
                sandbox.warm_up()
            finally:
                self._checkin(sandbox)

    def _prepare(self, path: Path, preview_side: int, scan: ScanFile | None, name: str) -> PreparedScan:
        options = PrepareOptions(
            self.bundle.preprocessing, self.limits, preview_side if self._has_heatmap else 0
        )
        if not self.isolate:
            return prepare_file(path, options, scan=scan, name=name)
        sandbox = self._checkout()
        try:
            return sandbox.prepare(path, options, scan=scan, name=name)
        finally:
            self._checkin(sandbox)

    def analyze(
        self,
        path: Path,
        sha256: str | None = None,
        timings_ms: dict[str, float] | None = None,
        *,
        preview_side: int | None = None,
        scan: ScanFile | None = None,
    ) -> ScanOutcome:
        """Decode, preprocess and infer one file.

        ``preview_side``: the longer side of the image handed back for the heat-map
        (0: none; None: :attr:`preview_side`). ``scan``: what the service hashed and
        admitted (:func:`~edge_runtime.files.read_scan`); given, only bytes
        with that hash are decoded, and every message and log line calls the scan by
        its keyed reference (:func:`~edge_runtime.privacy.scan_ref`), never its name.
        Without it (``edge-runtime process FILE`` on a workstation) the file is read
        by its path and messages name it.

        Raises:
            InputError: the file cannot be used (the caller quarantines it).
            InputChanged: ``scan`` given, and the file changed after it was hashed.
            BackendError: the engine failed (an operational fault, not the file's).
        """
        timings = dict(timings_ms or {})
        t0 = time.perf_counter()
        if sha256 is None:
            sha256 = file_sha256(path)
            timings["hash"] = (time.perf_counter() - t0) * 1000
        ref = scan_ref(sha256, path.name, key=self.reference_key)
        #: What messages (quarantine records, logs) call the scan.
        label = ref if scan is not None else display_name(path.name)
        logged = log_name(path.name, ref)
        t_decode = time.perf_counter()
        prepared = self._prepare(
            path, self.preview_side if preview_side is None else preview_side, scan, label
        )
        elapsed = (time.perf_counter() - t_decode) * 1000
        # Where the decoder child ran preprocessing, "decode" is the rest of the round trip:
        # decoding, hashing the pixels and the hand-over.
        timings["decode"] = max(0.0, elapsed - prepared.timings_ms["preprocess"])
        timings["preprocess"] = prepared.timings_ms["preprocess"]
        meta = prepared.metadata
        event(
            log,
            "decoded",
            "decoded %s in %.1f ms",
            logged,
            timings["decode"],
            file=logged,
            sha256=sha256[:16],
            decoder=prepared.decoder,
            rows=meta.get("rows"),
            columns=meta.get("columns"),
            # Header text goes to the log only where it is a code / a DICOM UID (digits and
            # dots): a sender may type a name into either.
            modality=public_metadata(meta).get("modality"),
            sop_instance_uid=loggable_uid(meta.get("sop_instance_uid")),
            duration_ms=round(timings["decode"], 2),
        )
        if self.policy is not None:
            self.policy.check(label, prepared.kind, meta)
        batch = prepared.sample_or_raise()[np.newaxis]  # the model's (1, ...) input, no copy

        t_inf = time.perf_counter()
        outputs = self.backend.infer_outputs(batch)  # one engine run: scores and, if any, the heat-map
        timings["infer"] = (time.perf_counter() - t_inf) * 1000
        probs = scores_to_probabilities(outputs.scores[0], self.bundle.output_activation)
        heat = (
            None
            if outputs.heatmap is None
            else positive_heat(outputs.heatmap[0], self.bundle.labels, self.bundle.positive_label)
        )
        features = outputs.features
        verdict = self.scope.verdict(prepared.kind, meta, None if features is None else features[:1])
        timings["total"] = timings.get("queue", 0.0) + (time.perf_counter() - t0) * 1000
        event(
            log,
            "intended_use",
            "%s %s the intended use%s",
            logged,
            "within" if verdict.within else "OUTSIDE",
            "" if verdict.within else f": {'; '.join(verdict.reasons)}",
            file=logged,
            within=verdict.within,
            reasons=list(verdict.reasons),
            # How the age was read (PatientAge, PatientBirthDate, missing, unreadable), never its value.
            age=meta.get("age_source"),
            age_checked=verdict.age_checked,
            ood_score=verdict.ood_score,
        )
        self.scope.enforce(label, verdict)
        analysis = analysis_of(
            file_name=display_name(path.name) if self.publish_file_names else ref,
            sha256=sha256,
            kind=prepared.kind,
            decoder=prepared.decoder,
            metadata=meta,
            model=self.model_info,
            labels=self.bundle.labels,
            probabilities=probs,
            positive_label=self.bundle.positive_label,
            threshold=self.threshold,
            timings_ms=timings,
            intended_use=verdict,
        )
        identity = input_identity(sha256, meta, prepared.pixels_sha256)
        own_id = message_id(identity, self.bundle.name, self.bundle.version)
        finding = analysis.finding
        decided = analysis.decision.label if analysis.decision else "not assessed"
        event(
            log,
            "inferred",
            "inferred %s: %s p=%.3f",
            logged,
            decided,
            finding.probability,
            file=logged,
            sha256=sha256[:16],
            decision=decided,
            probability=finding.probability,
            threshold=finding.threshold,
            message_id=own_id,
            preprocess_ms=round(timings["preprocess"], 2),
            duration_ms=round(timings["infer"], 2),
        )
        return ScanOutcome(
            analysis=analysis,
            message_id=own_id,
            heatmap=heat,
            image=prepared.preview if heat is not None else None,
            header=prepared.header,
            manufacturer=meta.get("manufacturer"),
        )

    def status_model(self) -> dict[str, Any]:
        """The model as status messages and the health file name it, with its conformance check.

        The reference image's name is left out (it stays in the log): status
        messages carry no file names.
        """
        model: dict[str, Any] = {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "backend": self.backend.name,
            "signature": self.bundle.signature.status,
        }
        if self.conformance is not None:
            summary = self.conformance.summary()
            summary.pop("worst", None)
            summary.pop("model", None)
            model["conformance"] = summary
        return model

    def close(self) -> None:
        with self._sandbox_ready:
            sandboxes, self._sandboxes, self._idle_sandboxes = self._sandboxes, [], []
        for sandbox in sandboxes:
            sandbox.close()
        self.backend.close()
