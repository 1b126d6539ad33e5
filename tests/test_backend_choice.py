"""``Model.Backend: auto``: the fastest engine that passes the conformance check on this CPU.

Real engines on the bundled model (ONNX Runtime and, where ``ai-edge-litert``
is installed, LiteRT), real timings, the real conformance check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import make_tiny_bundle

from edge_runtime import backends
from edge_runtime.backend_choice import MARGIN, choose_backend
from edge_runtime.bundle import load_bundle
from edge_runtime.config import RuntimeConfig
from edge_runtime.errors import BackendError, ConfigError, ConformanceError
from edge_runtime.pipeline import ScanAnalyzer

KERMANY = "cxr/kermany_pneumonia_224/test/PNEUMONIA/person1_virus_6.jpeg"


def _chosen_event(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    records = [r for r in caplog.records if getattr(r, "event", None) == "backend_chosen"]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    return records[0]


def test_auto_runs_the_fastest_conforming_engine_and_says_why(default_bundle, shared_data, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime")
    analyzer = ScanAnalyzer.from_bundle_path(default_bundle, "auto")
    try:
        chosen = analyzer.backend.name
        record = _chosen_event(caplog)
        fields = record.fields  # type: ignore[attr-defined]
        timed = fields["timings_ms"]
        fastest = min(timed.values())
        first = next(name for name in load_bundle(default_bundle).backends if name in timed)
        # The fastest, unless the bundle's first engine is within MARGIN of it (no flapping).
        if chosen == first:
            assert timed[chosen] <= fastest * (1 + MARGIN)
        else:
            assert timed[chosen] == fastest and timed[first] > fastest * (1 + MARGIN)
        assert set(timed) | set(fields["skipped"]) == set(load_bundle(default_bundle).backends)
        assert "onnxruntime" in timed  # a runtime dependency: always a candidate
        assert analyzer.conformance is not None and analyzer.conformance.passed
        assert analyzer.model_info["backend"] == chosen
        result = analyzer.analyze(shared_data / KERMANY).result().message()
    finally:
        analyzer.close()
    named = ScanAnalyzer.from_bundle_path(default_bundle, chosen)
    try:
        # The very engine a configuration naming it would run: the same answer, bit for bit.
        assert named.analyze(shared_data / KERMANY).result().message()["findings"] == result["findings"]
        assert result["model"]["sha256"] == named.model_info["sha256"]
    finally:
        named.close()


def test_an_engine_that_cannot_load_is_skipped_with_its_reason(default_bundle, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime")
    monkeypatch.setitem(backends._REGISTRY, "litert", "no_such_engine_module:Engine")
    engine, report, timings = choose_backend(load_bundle(default_bundle), threads=1)
    try:
        assert engine.name == "onnxruntime" and report is not None and report.passed
        skipped = {t.name: t.skipped for t in timings if t.skipped}
        assert "cannot be imported" in skipped["litert"]
        assert "litert skipped" in _chosen_event(caplog).getMessage()
    finally:
        engine.close()


def test_auto_does_not_buy_speed_with_a_different_answer(tmp_path: Path):
    """The only engine drifted from its references: refused exactly as when it is named."""
    bundle = make_tiny_bundle(tmp_path / "drift", conformance=True, drift=0.3)
    with pytest.raises(ConformanceError, match="conformance check FAILED"):
        ScanAnalyzer.from_bundle_path(bundle, "auto")


def test_no_engine_at_all_is_a_clear_error(default_bundle, monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "litert", "no_such_engine_module:Engine")
    monkeypatch.setitem(backends._REGISTRY, "onnxruntime", "no_such_engine_module:Engine")
    with pytest.raises(BackendError, match=r"Model\.Backend is auto, but no engine") as info:
        choose_backend(load_bundle(default_bundle), threads=1)
    assert "onnxruntime: " in info.value.message and "litert: " in info.value.message
    assert "Model.Backend" in info.value.action


def test_config_takes_auto_and_still_refuses_unknown_engines():
    assert RuntimeConfig.from_mapping({"Model": {"Backend": "auto"}}).model.backend == "auto"
    with pytest.raises(ConfigError, match=r"unknown backend 'fastest'.*auto"):
        RuntimeConfig.from_mapping({"Model": {"Backend": "fastest"}})
