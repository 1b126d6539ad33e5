"""Datasets from local paths: one opener for the chest X-ray sets, and the run's recorded split.

:func:`open_dataset` looks at a path and returns a :class:`Dataset`: the class
names, the training, validation and test items, and a sentence on how each
split was made. It recognises three kinds of path:

* ``folders``: a class-per-folder set ``root/{train,test}/<class>/``, such as
  ``cxr/kermany_pneumonia_224`` (``NORMAL``/``PNEUMONIA``) or
  ``cxr/nih1000_64`` (``0_normal``/``1_abnormal``). Class names are the sorted
  folder names, so label 0 is the first (the negative class) and label 1 the
  second; exactly two classes for now. ``train/`` plus ``valid/`` (or
  ``val/``) where present form the training pool, from which validation is
  carved by patient; the official ``test/`` stays the test split.
* ``pneumoniamnist``: the PneumoniaMNIST ``.npz`` (or the folder holding it).
  Items carry the 28x28 grey image in memory. Patient ids are unknown, so the
  npz's own ``val`` split is the validation split: MedMNIST carved it from
  Kermany's official training split (9:1), and its paper does not say whether
  by patient, so children may be shared between its train and val. The
  ``test`` split (Kermany's official 624 test images, cropped and shrunk) is
  for the final report only. The copy in ``shared/data`` has a modified train
  split: 826 of its 1 214 normals are missing (``PROVENANCE.md`` section 2).
* ``nih-subset``: the NIH ChestX-ray14 1024 px subset folder
  (``cxr/nih_chestxray14_1024_subset``, images in ``images/``), labelled
  from ``labels/Data_Entry_2017_v2020.csv.gz``, looked for next to the data
  folder and up to three folders above it (the subset's own ``labels.csv``,
  built from the same table, is the fallback). Binary: ``normal`` = "No
  Finding", ``abnormal`` = any finding; each item also keeps the 14 finding
  flags (:data:`NIH_FINDINGS`). The subset has no official test split, so
  test *and* validation are carved from it by patient.

Patients. Validation (and the NIH subset's test) are carved with
:func:`~training.data.images.split_by_patient`: patient-disjoint and stratified by
label. Patient ids come from Kermany file names (``person12_``,
``IM-0115``, ``NORMAL2-IM-1427``), NIH file names (``00000002_000.png`` ->
``00000002``) or the NIH table's ``Patient ID``; a file that follows no known
scheme is its own patient (a warning says how many). Where a set has an
official test split and patient ids that name the same person in every split
(NIH's numeric Patient ID), training-pool images of patients who also appear
in the test split are dropped, so no patient is in two splits:
``nih1000_64`` shares 16 patients (77 images) between its test and
train/valid folders. Kermany's ``personN`` / ``IM-xxxx`` numbers restart in
each official split (``person1`` is bacterial in ``train/`` but viral in
``test/``; ``person100`` the other way round), so they are compared only
between train and validation and nothing is dropped; the official test split
is the authors' own (``PROVENANCE.md``: patient-level independence between
train and test is not guaranteed by them). The test split itself is never changed.

Runs. :func:`split_record` is what ``training.model.train`` writes to
``split.json`` (dataset kind, path, class names, parameters and every item's
id), and :func:`items_from_split` rebuilds exactly those items from it, so
export, evaluation, reports and the TFLite export all score the same images.
An item's id is its path relative to the dataset root (POSIX), or
``<split>/<index>`` for an array file. Old ``split.json`` files (Kermany, no
``kind``) load as ``folders`` with the official test folder as the test split.

Modules: :mod:`.base` (the :class:`Dataset` record, patient keys,
constants), one reader per kind (:mod:`.folders`, :mod:`.pneumoniamnist`,
:mod:`.nih_subset`), :mod:`.registry` (detection and the readers by kind)
and :mod:`.splitting` (carving and ``split.json``).

No torch here (numpy and the standard library only), so the edge-side
report and the TFLite environment can use it.
"""

from __future__ import annotations

from .base import (
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    FOLDERS,
    KINDS,
    NIH_FINDINGS,
    NIH_SUBSET,
    NPZ,
    SPLIT_FILE,
    SPLIT_FORMAT,
    Dataset,
    patient_key,
    patient_overlap,
)
from .registry import READERS
from .splitting import (
    describe,
    items_from_split,
    open_dataset,
    open_run_split,
    read_split,
    run_spec,
    spec_for_size,
    split_matches,
    split_record,
    write_split,
)

__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "FOLDERS",
    "KINDS",
    "NIH_FINDINGS",
    "NIH_SUBSET",
    "NPZ",
    "READERS",
    "SPLIT_FILE",
    "SPLIT_FORMAT",
    "Dataset",
    "describe",
    "items_from_split",
    "open_dataset",
    "open_run_split",
    "patient_key",
    "patient_overlap",
    "read_split",
    "run_spec",
    "spec_for_size",
    "split_matches",
    "split_record",
    "write_split",
]
