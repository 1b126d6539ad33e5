"""The intake policy keeps a chest model away from hips and MR slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.decode import decode_file
from edge_runtime.errors import OutsideIntendedUse
from edge_runtime.intake import IntakePolicy

CHEST_USE = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "view_positions": ["PA", "AP"]}


def _check(policy: IntakePolicy, path: Path) -> dict:
    image = decode_file(path)
    policy.check(path.name, image.kind, image.metadata)  # raises OutsideIntendedUse when refused
    return {"kind": image.kind, **image.metadata}


def test_chest_radiographs_pass(shared_data: Path):
    """Chest CR/DX objects and a plain JPEG (no header to judge) are let through, each for its reason."""
    policy = IntakePolicy.from_intended_use(CHEST_USE, model_name="pneumonia-cxr")
    seen = {
        rel: _check(policy, shared_data / rel)
        for rel in (
            "dicom/pydicom_data/RG1_UNCR.dcm",
            "dicom/fo_dicom_via_dcmfx/CR-MONO1-10-chest.dcm",
            "dicom/siim_torchxrayvision/Fake_MONOHR1.dcm",
            "cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg",
        )
    }
    dicom = [m for m in seen.values() if m["kind"] == "dicom"]
    assert len(dicom) == 3 and all(m.get("modality") in (None, "CR", "DX") for m in dicom), dicom
    assert all(m.get("body_part_examined") in (None, "", "CHEST") for m in dicom), dicom
    assert seen["cxr/kermany_pneumonia_224/test/NORMAL/IM-0001-0001.jpeg"]["kind"] == "image"


def test_hip_and_mr_are_refused_with_the_reason(shared_data: Path):
    policy = IntakePolicy.from_intended_use(CHEST_USE, model_name="pneumonia-cxr")
    with pytest.raises(OutsideIntendedUse, match="Body Part Examined 'HIP'") as info:
        _check(policy, shared_data / "dicom/wg04/RG2_RLE")
    assert "pneumonia-cxr is only meant for CHEST" in str(info.value)
    assert "EnforceIntendedUse" in info.value.action
    with pytest.raises(OutsideIntendedUse, match="Modality 'MR'"):
        _check(policy, shared_data / "dicom/pydicom_testfiles/MR_small.dcm")


def test_missing_tags_pass_unless_required(shared_data: Path):
    path = shared_data / "dicom/pydicom_testfiles/CT_small.dcm"  # no body part, modality CT
    lenient = IntakePolicy.from_intended_use({"body_parts": ["CHEST"]}, model_name="m")
    _check(lenient, path)
    strict = IntakePolicy.from_intended_use({"body_parts": ["CHEST"]}, model_name="m", require_tags=True)
    with pytest.raises(OutsideIntendedUse, match="has no Body Part Examined"):
        _check(strict, path)
