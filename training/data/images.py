"""Data for training: file lists, a patient-disjoint split, the dataset, caches.

Every image is read with the edge's :func:`~edge_runtime.decode.decode_file`
and turned into a tensor with the edge's
:func:`~edge_runtime.preprocess.preprocess`, so the network never sees a
tensor built differently from the ones it will get on the device. Any
augmentation works on the decoded grey image *before* ``preprocess``. Sets
that ship as arrays (PneumoniaMNIST) hold the image in the item, already in
the decoder's convention; :mod:`training.data.datasets` builds items for every set.

No torch here: samples are numpy arrays (``torch.from_numpy`` wraps them
without a copy), which keeps this module usable from benchmarks and tests
that run without the training extra.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.decode import decode_file
from edge_runtime.preprocess import PreprocessSpec, preprocess

__all__ = [
    "LABELS",
    "MILD_AUGMENTATION",
    "Augmentation",
    "CXRDataset",
    "ImageCache",
    "Item",
    "augment_grey",
    "label_counts",
    "list_items",
    "patient_id",
    "split_by_patient",
]

#: Class names in label-id order: folder ``NORMAL`` is 0, ``PNEUMONIA`` is 1.
LABELS: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
# personN_bacteria_M.jpeg, personN_virus_M.jpeg, person447_virus_921_1.jpeg
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
# IM-0115-0001.jpeg, IM-0429-0001-0002.jpeg, NORMAL2-IM-1427-0001.jpeg
_NORMAL_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    """One labelled image.

    Attributes:
        path: Image file. For an image held in memory (``image`` set), a
            virtual path naming it, e.g. ``pneumoniamnist.npz/train/17``.
        label: Index into the dataset's class names (:data:`LABELS` for Kermany).
        patient: Patient key; images sharing it must stay in the same split.
        image: The decoded grey image (2-D float32 in [0, 1], as
            :func:`~edge_runtime.decode.decode_file` returns it) when the item
            comes from an array file instead of an image file; None reads
            ``path``. Left out of equality, hashing and repr.
        findings: Multi-label finding flags (0/1) for sets that have them
            (NIH ChestX-ray14: one per name in the dataset's ``findings``);
            empty otherwise. Training uses ``label`` only.
    """

    path: Path
    label: int
    patient: str
    image: np.ndarray | None = field(default=None, compare=False, hash=False, repr=False)
    findings: tuple[int, ...] = field(default=(), repr=False)

    def pixels(self) -> np.ndarray:
        """The decoded grey image: ``image`` when held in memory, else ``decode_file(path).pixels``."""
        if self.image is not None:
            return self.image
        return decode_file(self.path).pixels


def patient_id(filename: str) -> str:
    """The patient key encoded in a Kermany file name.

    The Kermany set has several images per child, and the split must keep a
    child's images together or validation would score memorised patients.

    Args:
        filename: A base name such as ``person1_bacteria_1.jpeg``,
            ``IM-0115-0001.jpeg`` or ``NORMAL2-IM-1427-0001.jpeg``.

    Returns:
        ``person1``, ``IM-0115`` or ``NORMAL2-IM-1427`` (the prefix is kept:
        ``NORMAL2-IM-1427`` and ``IM-1427`` come from different series).

    Raises:
        ValueError: for a name that follows neither convention, so a renamed
            or foreign file is noticed instead of becoming its own "patient".
    """
    name = Path(filename).name
    for pattern in (_PERSON, _NORMAL_IM):
        match = pattern.match(name)
        if match:
            return match.group(1)
    raise ValueError(
        f"Cannot parse a patient id from {name!r}: expected 'personN_<kind>_M.jpeg' or "
        "'[NORMAL2-]IM-xxxx-yyyy.jpeg' (Kermany naming)."
    )


def list_items(root: str | Path, split: str) -> list[Item]:
    """List ``root/<split>/<LABEL>/*`` as items, sorted by path for reproducibility.

    Args:
        root: The dataset folder, e.g. ``../shared/data/cxr/kermany_pneumonia_224``.
        split: ``train`` or ``test``.

    Raises:
        FileNotFoundError: when a class folder is missing or empty, naming it.
    """
    items: list[Item] = []
    for label, name in enumerate(LABELS):
        folder = Path(root) / split / name
        if not folder.is_dir():
            raise FileNotFoundError(f"Class folder {folder} does not exist.")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"Class folder {folder} holds no images.")
        items.extend(Item(path=p, label=label, patient=patient_id(p.name)) for p in files)
    return items


def label_counts(items: Iterable[Item], classes: Sequence[str] = LABELS) -> dict[str, int]:
    """Images per class name, in ``classes`` order (for logs and manifests)."""
    counts = Counter(item.label for item in items)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}


def split_by_patient(items: Sequence[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Carve a validation set out of the training items, patient-disjoint and stratified.

    Patients (not images) are assigned to validation, so no child appears on
    both sides. Within each label the patients are shuffled with ``seed`` and
    taken until that label's validation image count reaches
    ``round(val_fraction * images_of_that_label)``, so each class keeps its
    share. A patient whose images carry mixed labels is filed under their
    majority label (ties go to the higher label id).

    Only ever call this on the training split: the official test split must
    not influence any choice (threshold, epochs, hyper-parameters).

    Args:
        items: Training items.
        val_fraction: Target share of images in validation, in (0, 1).
        seed: Makes the split reproducible.

    Returns:
        ``(train, val)``, each in the order of ``items``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_patient[item.patient].append(index)
    patient_label: dict[str, int] = {}
    for patient, indices in by_patient.items():
        counts = Counter(items[i].label for i in indices)
        patient_label[patient] = max(counts, key=lambda lab: (counts[lab], lab))

    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in sorted(set(patient_label.values())):
        patients = sorted(p for p, lab in patient_label.items() if lab == label)
        total = sum(len(by_patient[p]) for p in patients)
        target = round(val_fraction * total)
        taken = 0
        for position in rng.permutation(len(patients)):
            if taken >= target:
                break
            patient = patients[position]
            val_patients.add(patient)
            taken += len(by_patient[patient])
    train = [item for item in items if item.patient not in val_patients]
    val = [item for item in items if item.patient in val_patients]
    return train, val


@dataclass(frozen=True)
class Augmentation:
    """Strengths of the random variants used in training (all applied before ``preprocess``).

    The defaults mimic what differs between chest films from different
    machines, sites and years: patient positioning (rotation, shift), field of
    view and the aspect ratio the film was squashed to (random resized crop:
    zoom and aspect jitter; the Kermany 224 px files were resized without
    keeping their aspect ratio, 384-2 916 x 127-2 713 px originals), and
    exposure/processing (brightness, contrast, gamma). Horizontal flip is off
    by default: the heart is on the left and a flipped film is not a
    plausible input; turn it on only for a task where laterality does not
    matter.

    Attributes:
        rotate_deg: Maximum absolute rotation.
        zoom: (min, max) magnification; > 1 crops into the image like a
            random resized crop, < 1 shows more border.
        aspect: Maximum aspect-ratio change factor (x vs y scale), log-uniform.
        shift: Maximum translation as a fraction of the image size.
        brightness: Maximum additive brightness change (intensities in [0, 1]).
        contrast: Maximum relative contrast change.
        gamma: Maximum absolute log-gamma.
        hflip: Flip horizontally with probability 0.5.
    """

    rotate_deg: float = 10.0
    zoom: tuple[float, float] = (0.9, 1.25)
    aspect: float = 1.2
    shift: float = 0.06
    brightness: float = 0.08
    contrast: float = 0.2
    gamma: float = 0.3
    hflip: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form (stored in the run summary)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Augmentation:
        values = dict(data)
        if "zoom" in values:
            values["zoom"] = tuple(values["zoom"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


#: The milder augmentation the first bundled model (0.1.0) was trained with.
MILD_AUGMENTATION = Augmentation(
    rotate_deg=7.0, zoom=(0.92, 1.08), aspect=1.0, shift=0.04, brightness=0.0, contrast=0.1, gamma=0.2
)


def augment_grey(image: np.ndarray, rng: np.random.Generator, aug: Augmentation | None = None) -> np.ndarray:
    """A random variant of a decoded grey image, applied before ``preprocess``.

    One affine warp does rotation, anisotropic zoom (random resized crop with
    aspect jitter) and shift, so the image is resampled once; then gamma,
    contrast and brightness change the exposure.

    Args:
        image: 2-D float32 in [0, 1], any size (the decoder's output).
        rng: Source of randomness (the caller seeds it).
        aug: Strengths; None takes :class:`Augmentation`'s defaults.

    Returns:
        A new 2-D float32 image of the same size, in [0, 1].
    """
    aug = aug or Augmentation()
    rows, cols = image.shape
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    zoom = math.exp(rng.uniform(math.log(aug.zoom[0]), math.log(aug.zoom[1])))
    log_aspect = math.log(max(aug.aspect, 1.0))
    aspect = math.exp(rng.uniform(-log_aspect, log_aspect))
    sx, sy = zoom * math.sqrt(aspect), zoom / math.sqrt(aspect)
    if aug.hflip and rng.random() < 0.5:
        sx = -sx
    shift = rng.uniform(-aug.shift, aug.shift, size=2) * (cols, rows)
    cos, sin = math.cos(angle), math.sin(angle)
    # Output pixel = R(angle) @ diag(sx, sy) @ (input - centre) + centre + shift.
    linear = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]], dtype=np.float64)
    centre = np.array([cols / 2.0, rows / 2.0])
    matrix = np.hstack([linear, (centre - linear @ centre + shift)[:, None]])
    warped = cv2.warpAffine(
        np.ascontiguousarray(image, dtype=np.float32),
        matrix,
        (cols, rows),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    np.clip(warped, 0.0, 1.0, out=warped)
    gamma = math.exp(rng.uniform(-aug.gamma, aug.gamma))
    contrast = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    brightness = rng.uniform(-aug.brightness, aug.brightness)
    out = np.power(warped, gamma, dtype=np.float32)
    out = (out - 0.5) * contrast + 0.5 + brightness
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


class CXRDataset:
    """Map-style dataset: ``dataset[i] -> (sample, label)`` built with the edge code.

    Works as a ``torch.utils.data.Dataset`` (it only needs ``__len__`` and
    ``__getitem__``). In eval mode (``augment=False``) a sample is exactly
    ``preprocess(decode_file(path).pixels, spec)`` (or ``preprocess(item.image,
    spec)`` for an image held in memory); tests check this bit for bit.

    Args:
        items: Images to serve.
        spec: The preprocessing spec that will be written into the bundle.
        augment: Apply :func:`augment_grey` before preprocessing.
        augmentation: Its strengths (None: :class:`Augmentation` defaults).
        seed: Base seed of the augmentation; view ``v`` of image ``i`` is
            always the same image, so runs are reproducible.
    """

    def __init__(
        self,
        items: Sequence[Item],
        spec: PreprocessSpec,
        *,
        augment: bool = False,
        seed: int = 0,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.items = list(items)
        self.augmentation = augmentation or Augmentation()
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        view = self.epoch + 1 if self.augment else 0
        return self.sample(index, view), self.items[index].label

    def set_epoch(self, epoch: int) -> None:
        """Select which augmented view ``__getitem__`` returns (one per epoch)."""
        self.epoch = epoch

    @property
    def labels(self) -> np.ndarray:
        """Label ids as an int64 array, in item order."""
        return np.array([item.label for item in self.items], dtype=np.int64)

    def sample(self, index: int, view: int = 0) -> np.ndarray:
        """The preprocessed sample of image ``index``.

        Args:
            index: Item index.
            view: 0 is the image as the edge sees it; ``v > 0`` is the v-th
                deterministic augmentation of it.
        """
        pixels = self.items[index].pixels()
        if view > 0:
            rng = np.random.default_rng((self.seed, index, view))
            pixels = augment_grey(pixels, rng, self.augmentation)
        return preprocess(pixels, self.spec)


def _level_lut(spec: PreprocessSpec) -> np.ndarray:
    """(channels, 256) float32: the sample value of each 8-bit grey level, per channel.

    Uses the same float32 operations as :func:`preprocess` after its 8-bit
    rounding, so ``lut[c][level]`` equals what ``preprocess`` writes.
    """
    grey = np.arange(256, dtype=np.float32)
    np.divide(grey, 255.0, out=grey)
    mean = np.broadcast_to(np.asarray(spec.mean, dtype=np.float32), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.std, dtype=np.float32), (spec.channels,))
    lut = np.empty((spec.channels, 256), dtype=np.float32)
    for c in range(spec.channels):
        np.subtract(grey, mean[c], out=lut[c])
        np.divide(lut[c], std[c], out=lut[c])
    return lut


class ImageCache:
    """All samples of a dataset decoded once and held compactly in memory.

    With ``spec.quantize_8bit`` every sample is a per-channel function of one
    8-bit grey plane, so one uint8 plane per image is stored (50 KB at
    224 px instead of 600 KB) and samples are rebuilt through a lookup table.
    Each image is checked at build time to rebuild bit-identically to
    ``preprocess``'s output; a mismatch raises instead of silently training
    on different tensors. Without 8-bit quantization full float32 samples
    are stored.

    Build with :meth:`build`.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        labels: np.ndarray,
        levels: np.ndarray | None,
        full: np.ndarray | None,
    ) -> None:
        self.spec = spec
        self.labels = labels
        self._levels = levels
        self._full = full
        self._lut = _level_lut(spec) if levels is not None else None

    @property
    def views(self) -> int:
        """Views per image (1 = unaugmented only)."""
        store = self._levels if self._levels is not None else self._full
        assert store is not None
        return int(store.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def levels(self) -> np.ndarray | None:
        """``(views, N, H, W)`` uint8 grey levels (``spec.quantize_8bit``), else None. Read-only use."""
        return self._levels

    @property
    def lut(self) -> np.ndarray | None:
        """``(channels, 256)`` float32: channel ``c`` of a sample is ``lut[c][level]``; None unquantized."""
        return self._lut

    @property
    def nbytes(self) -> int:
        store = self._levels if self._levels is not None else self._full
        assert store is not None
        return int(store.nbytes)

    @classmethod
    def build(
        cls,
        dataset: CXRDataset,
        views: int = 1,
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    ) -> ImageCache:
        """Decode and preprocess every image of ``dataset`` ``views`` times.

        Args:
            dataset: Source; view 0 is unaugmented, views 1.. are augmented.
            views: How many variants per image to keep.
            progress: Optional wrapper for the index iterator (e.g. tqdm).
        """
        spec = dataset.spec
        n = len(dataset)
        quantized = spec.quantize_8bit
        lut = _level_lut(spec) if quantized else None
        plane = (spec.height, spec.width)
        levels = np.empty((views, n, *plane), dtype=np.uint8) if quantized else None
        full = None if quantized else np.empty((views, n, *spec.sample_shape), np.float32)
        jobs: Iterable[int] = range(n * views)
        for job in progress(jobs) if progress else jobs:
            view, index = divmod(job, n)
            sample = dataset.sample(index, view)
            if levels is None:
                assert full is not None
                full[view, index] = sample
                continue
            assert lut is not None
            first = sample[0] if spec.layout == "NCHW" else sample[..., 0]
            grey = first * np.float32(spec.std[0]) + np.float32(spec.mean[0])
            level = np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)
            if not np.array_equal(_rebuild(lut, level[None], spec)[0], sample):
                raise RuntimeError(
                    f"Cached sample of {dataset.items[index].path.name} (view {view}) does not "
                    "rebuild bit-identically to preprocess(); refusing to train on it."
                )
            levels[view, index] = level
        return cls(spec, dataset.labels, levels, full)

    def batch(self, indices: np.ndarray | Sequence[int], view: int = 0) -> np.ndarray:
        """Samples ``indices`` of ``view`` as one float32 batch in the spec's layout."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._levels is not None:
            assert self._lut is not None
            return _rebuild(self._lut, self._levels[view, idx], self.spec)
        assert self._full is not None
        return self._full[view, idx]


def _rebuild(lut: np.ndarray, levels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(B, H, W) uint8 grey levels -> (B, *sample_shape) float32 via the lookup table."""
    axis = 1 if spec.layout == "NCHW" else 3
    return np.stack([lut[c][levels] for c in range(spec.channels)], axis=axis)
