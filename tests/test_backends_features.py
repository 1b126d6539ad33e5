"""Backends return the pooled ``features`` output from the same run, and check it at load.

ONNX Runtime names its outputs; LiteRT numbers them, so the LiteRT backend tells the scores
(one column per label) from the features (the manifest's width) by shape, and refuses a file
whose outputs do not fit the manifest with a message an administrator can act on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_tiny_bundle, sign_bundle

from edge_runtime.backends.base import BackendOutput
from edge_runtime.backends.litert import LiteRtBackend
from edge_runtime.backends.onnx import OnnxRuntimeBackend
from edge_runtime.bundle import load_bundle
from edge_runtime.errors import ModelBundleError


def test_onnx_backend_returns_features_from_the_same_run(tmp_path: Path) -> None:
    bundle = load_bundle(make_tiny_bundle(tmp_path / "b", ood=True))
    backend = OnnxRuntimeBackend()
    backend.load(bundle)
    batch = np.full((2, 3, 64, 64), 0.25, dtype=np.float32)
    batch[1] = -0.5
    out = backend.infer_outputs(batch)
    assert isinstance(out, BackendOutput)
    assert out.scores.shape == (2, 2) and out.features is not None
    assert out.features.shape == (2, 3) and out.features.dtype == np.float32
    np.testing.assert_allclose(out.features, [[0.25] * 3, [-0.5] * 3], atol=1e-6)
    backend.close()


def test_onnx_backend_without_features_in_the_manifest_returns_none(tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend()
    backend.load(load_bundle(make_tiny_bundle(tmp_path / "plain")))
    assert backend.infer_outputs(np.zeros((1, 3, 64, 64), dtype=np.float32)).features is None


def test_onnx_backend_refuses_a_features_output_of_another_width(tmp_path: Path) -> None:
    folder = make_tiny_bundle(tmp_path / "wide", ood=True)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["output"]["features"]["dims"] = [4]
    del manifest["intended_use"]["ood"]  # only the backend's own check is left to notice
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    sign_bundle(folder)
    bundle = load_bundle(folder)
    with pytest.raises(ModelBundleError) as info:
        OnnxRuntimeBackend().load(bundle)
    assert "'features' has shape" in info.value.message and "[batch, 4]" in info.value.message
    assert "Repackage" in info.value.action


class _FakeInterpreter:
    def __init__(self, shapes: list[list[int]]) -> None:
        self._details = [
            {"index": i, "shape": np.asarray(shape), "quantization": (0.0, 0)}
            for i, shape in enumerate(shapes)
        ]

    def get_output_details(self) -> list[dict[str, Any]]:
        return self._details


def _litert(shapes: list[list[int]], *, classes: int = 2, width: int | None = 448, heatmap: bool = True):
    backend = LiteRtBackend()
    backend._interpreter = _FakeInterpreter(shapes)
    backend._classes = classes
    backend._features_width = width
    backend._wants_heatmap = heatmap
    backend._pick_outputs("model.int8.tflite")
    return backend


@pytest.mark.parametrize(
    "shapes",
    [
        [[1, 2], [1, 3, 3, 2], [1, 448]],
        [[1, 448], [1, 2], [1, 3, 3, 2]],  # converters number outputs in any order
        [[1, 3, 3, 2], [1, 448], [1, 2]],
    ],
)
def test_litert_tells_scores_from_features_by_width(shapes: list[list[int]]) -> None:
    backend = _litert(shapes)
    assert list(backend._output["shape"]) == [1, 2]
    assert backend._features is not None and list(backend._features["shape"]) == [1, 448]
    assert backend._heatmap is not None and len(backend._heatmap["shape"]) == 4


def test_litert_without_features_in_the_manifest_ignores_them() -> None:
    backend = _litert([[1, 448], [1, 2], [1, 3, 3, 2]], width=None)
    assert list(backend._output["shape"]) == [1, 2] and backend._features is None


@pytest.mark.parametrize(
    "shapes",
    [
        [[1, 2], [1, 3, 3, 2]],  # the file has no features output
        [[1, 2], [1, 3, 3, 2], [1, 500]],  # another width than the manifest's
        [[1, 3], [1, 3, 3, 2], [1, 448]],  # no scores output with one column per label
    ],
)
def test_litert_refuses_outputs_that_do_not_fit_the_manifest(shapes: list[list[int]]) -> None:
    with pytest.raises(ModelBundleError) as info:
        _litert(shapes)
    message = info.value.message
    assert "a [batch, 2] scores output and one [batch, 448] features output" in message
    assert "its outputs:" in message and "model.int8.tflite" in message
    assert "same build" in info.value.action
