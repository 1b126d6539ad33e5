"""The bundle's ``MODEL_CARD.md``: the prose for the people who decide whether to deploy it.

Every number in it comes from the manifest (:mod:`training.bundle.manifest`) or the
run's summaries, never retyped; this module only words them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import DATA_CITATION, DataCard, _family, data_card

__all__ = [
    "MODEL_CARD_NAME",
    "render_model_card",
]

MODEL_CARD_NAME = "MODEL_CARD.md"


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _row(name: str, m: dict[str, Any], auc_note: str = "") -> str:
    return (
        f"| {name} | {m['n']} | {m['auc']:.4f}{auc_note} | {_pct(m['accuracy'])} "
        f"| {_pct(m['sensitivity'])} | {_pct(m['specificity'])} |"
    )


def _spec_text(spec: dict[str, Any]) -> str:
    mean = ", ".join(f"{v:g}" for v in spec["mean"])
    std = ", ".join(f"{v:g}" for v in spec["std"])
    rounding = "8-bit rounding" if spec["quantize_8bit"] else "no 8-bit rounding"
    grey = f"grey repeated on {spec['channels']} channels" if spec["channels"] > 1 else "one grey channel"
    return (
        f"({spec['resize']} to {spec['height']}x{spec['width']} with {spec['interpolation']} interpolation, "
        f"{rounding},\n  (x - {mean}) / {std}, {grey})"
    )


def _architecture(manifest: dict[str, Any]) -> str:
    """The card's architecture bullet: family, pretraining, trained part, export and quantization."""
    tr = manifest["training"]
    pretrained = tr["pretrained"]
    if pretrained.startswith("ImageNet"):
        start = "ImageNet-pretrained"
    elif pretrained.startswith("none"):
        start = "randomly initialised (no pretrained weights)"
    else:
        start = f"initialised from {pretrained.removeprefix('weights file ')}"
    head = "the 1280x2 classifier" if tr["architecture"] == "efficientnet-lite0" else "the classifier"
    if tr.get("framework") == "keras":
        start += " (PyTorch weights ported layer by layer to Keras)"
        exported = "Trained in TensorFlow/Keras, exported to ONNX opset 17 by tf2onnx"
    else:
        exported = "Exported to ONNX opset 17"
    return f"""- **Architecture:** {_family(tr["architecture"])}, {start}; {tr["trainable"]} fine-tuned.
  {exported} with the softmax inside the graph, then INT8 static
  quantization of every convolution ({manifest["artifacts"][0]["quantization"]}, calibrated on
  {tr["calibration_images"]} training images); {head} and the softmax stay FP32 so
  the probabilities keep full resolution."""


def _reproduce(config: dict[str, Any] | None, spec: dict[str, Any], bundle_dir: str | Path | None) -> str:
    """The ``pipeline`` command line of a run, from its recorded config."""
    config = config or {}
    out = config.get("out_dir")
    parts = [
        f"--data {config.get('data_root', '<data>')}",
        f"--model {config.get('model', '<model>')} --weights {config.get('weights') or 'none'} "
        f"--size {spec['height']}",
        f"--seed {config.get('seed', 2018)} --val-fraction {config.get('val_fraction', 0.15)}",
    ]
    options = _training_options(config)
    if options:
        parts.append(options)
    parts.append(
        f"--out {f'runs/{Path(out).name}' if out else 'runs/<run>'} --bundle {bundle_dir or '<bundle>'}"
    )
    command = "python -m training pipeline "
    if config.get("framework") == "keras":
        command += "--framework keras "
    return command + " \\\n    ".join(parts)


_THRESHOLD_NOTE = """The threshold was chosen on
the validation split: quote the test numbers."""
_SATURATION_NOTE = """The validation AUC is close to
1 and the test AUC lower, so the validation split overstates performance on new
images: quote the test numbers."""


def _metrics_text(manifest: dict[str, Any], evaluation: dict[str, Any], test_name: str, note: str) -> str:
    """The model card's metrics table (validation and test, INT8) and the FP32/INT8 comparison."""
    op = manifest["operating_point"]
    val = manifest["metrics"]["validation"]
    test = manifest["metrics"]["test"]
    agree = manifest["metrics"]["int8_vs_fp32_validation"]
    ref = evaluation["test"]["reference"]["int8_at_0.5"]
    fp32 = evaluation["test"]["reference"]["fp32_at_threshold"]
    lo, hi = test["auc_ci95"]
    return f"""## Metrics (INT8 model, threshold {op["threshold"]:.4f})

| split | n | AUC | accuracy | sensitivity | specificity |
|---|---|---|---|---|---|
{_row("validation (patient-disjoint)", val)}
{_row(test_name, test, f" (95 % CI {lo:.4f}-{hi:.4f})")}

For reference only: the FP32 model before quantization has test AUC {fp32["auc"]:.4f}; the INT8
model at a 0.5 threshold has test accuracy {_pct(ref["accuracy"])}, sensitivity
{_pct(ref["sensitivity"])}, specificity {_pct(ref["specificity"])}. {note}

INT8 vs FP32 on validation: max |delta p| {agree["max_abs_diff"]:.4f}, mean {agree["mean_abs_diff"]:.4f},
same decision at the threshold for {_pct(agree["decision_agreement"])} of images."""


def _training_text(
    tr: dict[str, Any],
    config: dict[str, Any] | None,
    spec: dict[str, Any],
    bundle_dir: str | Path | None,
) -> str:
    """The model card's account of the staged training and the command that reproduces it."""
    ep = tr["epochs"]
    replanned = (
        f" (shortened to {ep['stage2_final_plan']} when epochs ran slower)"
        if ep["stage2_final_plan"] < ep["stage2_planned"]
        else ""
    )
    options = _training_options(config or {})
    if config is None or "augmentation" not in config or "--augment mild" in options:
        aug_text = "small rotation/zoom/shift, gamma/contrast; no flips"
    else:
        aug_text = "rotation, zoom with aspect jitter, shift, brightness/contrast/gamma; no flips"
    smoothing = (config or {}).get("label_smoothing", 0.0)
    if smoothing:
        aug_text += f"; label smoothing {smoothing}"
    threads = tr["hardware"].split(" CPU")[0]
    if tr.get("framework") == "keras":
        where = f"{threads} CPU threads, {tr['hardware'].split(', ', 1)[1]}"
        plan = (
            f"Stage 2 could run up to {ep['stage2_planned']} epoch(s), ran {ep['stage2_run']}, and kept "
            f"epoch {ep['stage2_best']}"
        )
        budget = (
            "Reproduce with the command below (TensorFlow in `.venv-keras`: `bash training/keras_env.sh "
            "setup` once). The time budget only stops before an epoch that would not fit, so on a slower "
            "machine raise `--time-budget-min` to run the same epochs:"
        )
    else:
        where = f"{threads} CPU threads"
        plan = (
            f"Stage 2 was planned for\n{ep['stage2_planned']} epoch(s) from a timing probe{replanned}, ran "
            f"{ep['stage2_run']}, and kept\nepoch {ep['stage2_best']}"
        )
        budget = (
            "Reproduce with the command below. The stage-2 epoch count comes from a time\n"
            "budget measured on the machine, so on a slower or busier one add\n"
            f"`--epochs {ep['stage2_final_plan']} --time-budget-min 120` to plan the same schedule:"
        )
    return f"""Two-stage transfer learning on {where} (`python -m training pipeline`):
classifier on frozen embeddings, then the last blocks + head on cached
activations with a class-weighted loss, cosine schedule and early stopping
on validation AUC (near-ties by validation log-loss); {tr["augmented_views_per_train_image"]} augmented
view(s) per training image ({aug_text}). Seed {tr["seed"]}. {plan}. Training took
{tr["wall_clock_s"] / 60:.1f} min.

{budget}

```
{_reproduce(config, spec, bundle_dir)}
```"""


#: ``TrainConfig`` field -> (CLI flag, CLI default) for the options a reproduce command must repeat.
_TRAIN_FLAGS = {
    "cut": ("--cut", None),
    "aug_views": ("--aug-views", 1),
    "epochs": ("--epochs", 10),
    "patience": ("--patience", 3),
    "head_epochs": ("--head-epochs", 30),
    "batch_size": ("--batch-size", 32),
    "lr": ("--lr", 3e-4),
    "label_smoothing": ("--label-smoothing", 0.1),
}


def _training_options(config: dict[str, Any]) -> str:
    """The training flags of a recorded config that differ from the CLI's defaults."""
    from ..data.images import MILD_AUGMENTATION

    flags = [
        f"{flag} {config[key]}"
        for key, (flag, default) in _TRAIN_FLAGS.items()
        if key in config and config[key] != default
    ]
    aug = config.get("augmentation")
    if aug is not None:
        mild = {k: v for k, v in MILD_AUGMENTATION.to_dict().items() if k != "hflip"}
        if {k: v for k, v in aug.items() if k != "hflip"} == mild:
            flags.append("--augment mild")
        if aug.get("hflip"):
            flags.append("--hflip")
    if config.get("freeze_bn") is False:
        flags.append("--train-bn")
    return " ".join(flags)


_DATA_TEXT = {
    "nih": (
        "Frontal chest radiographs from the NIH Clinical Center (Bethesda, USA), adults and\n"
        "children, with 14 finding labels text-mined from the radiology reports (not verified\n"
        "by radiologists; expect label noise). The model was trained on normal (`No Finding`)\n"
        "vs abnormal (any of the 14 findings); the findings themselves are not told apart."
    ),
    "pneumoniamnist": (
        "The Kermany paediatric images (Guangzhou Women and Children's Medical Center, children\n"
        "aged 1-5), centre-cropped and shrunk to 28x28 px by MedMNIST. The copy used here has a\n"
        "modified training split: 826 of the official 1 214 normal images are missing."
    ),
    "other": "Source, licence and label quality of these data are not recorded here.",
}
_DATA_LIMITS = {
    "nih": (
        "- **One centre, noisy labels.** NIH Clinical Center images, mostly adults; labels were\n"
        "  text-mined from reports, not verified, and `abnormal` lumps 14 different findings\n"
        "  (some, such as small nodules, barely visible at a small input size)."
    ),
    "pneumoniamnist": (
        "- **Paediatric only, one centre, 28 px.** Almost all detail is lost at 28x28; full-size\n"
        "  films shrunk by the edge differ from the training images. MedMNIST's validation split\n"
        "  may share children with its training split (patient ids are not published)."
    ),
    "other": "- **Unknown provenance.** Check where the data come from before trusting any number here.",
}


def _generic_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    card: DataCard,
    split: dict[str, Any] | None,
    config: dict[str, Any] | None,
    bundle_dir: str | Path | None,
) -> str:
    """The model card for any run other than the Kermany EfficientNet-Lite0 one."""
    op = manifest["operating_point"]
    test = manifest["metrics"]["test"]
    tr = manifest["training"]
    spec = manifest["preprocessing"]
    inp = manifest["input"]
    shape = ", ".join(str(v) for v in inp["shape"][1:])
    labels = manifest["labels"]
    parts = tr["split"]

    def counts(part: dict[str, Any]) -> str:
        return ", ".join(f"{part.get(name, 0)} {name}" for name in labels)

    notes = "".join(f"\n- {note}." for note in (split or {}).get("notes") or [])
    data_text = _DATA_TEXT.get(card.key, "")
    if card.key == "kermany":
        data_text = (
            "Images from the Guangzhou Women and Children's Medical Center, children aged 1-5,\n"
            "resized to 224x224 by a third party without keeping the aspect ratio."
        )
    limits = _DATA_LIMITS.get(card.key, "")
    if card.key == "kermany":
        limits = (
            "- **Paediatric only, one centre.** Trained and tested on children from one Guangzhou\n"
            "  hospital; performance elsewhere is unknown and likely lower."
        )
    prevalence = test["n_positive"] / test["n"] if test.get("n") else float("nan")
    licence = "" if card.license in card.citation else f" Licence: {card.license}."
    return f"""# Model card: {manifest["name"]} {manifest["version"]}

> **NOT FOR DIAGNOSTIC USE.** A research and engineering demonstrator. It has
> not been cleared by any regulator, was trained on {card.short},
> and must not inform the care of any patient.

## What it is

- **Task:** probability that {card.task} (`labels` = {", ".join(f"`{name}`" for name in labels)}).
{_architecture(manifest)}
- **Input:** `{inp["name"]}`, {inp["dtype"]} `[batch, {shape}]` {spec["layout"]}, built by
  `edge_runtime.preprocess.preprocess` with the spec in `manifest.json`
  {_spec_text(spec)}.
- **Output:** `probabilities`, `[batch, {len(labels)}]` (already softmaxed; activation `none`).
- **Decision:** {op["rule"]}, threshold **{op["threshold"]:.4f}** = the {op["method"]}.

## Intended use

Demonstration on an edge device: frontal (PA/AP) chest radiographs (CR, DX) of the
population the training data come from ({manifest["intended_use"]["population"]}).
`intended_use` in the manifest lists these so the runtime's intake policy can refuse
other studies from DICOM headers.

**Out of scope:** other populations, lateral views, other body parts, CT, any diagnostic
or treatment decision, and any finding the labels `{labels[0]}`/`{labels[1]}` do not describe.

## Data

{tr["data"]["name"]}. {card.citation}{licence}

{data_text}

- Training and validation: train {parts["train"]["images"]} images / {parts["train"]["patients"]} patients
  ({counts(parts["train"])}), validation {parts["validation"]["images"]} images /
  {parts["validation"]["patients"]} patients ({counts(parts["validation"])}); validation: {parts["method"]}.
- Test: {test["split"]}, scored once at the end and never used to choose anything.{notes}

## Training

{_training_text(tr, config, spec, bundle_dir)}

{_metrics_text(manifest, evaluation, "test", _THRESHOLD_NOTE)}

## Limitations

{limits}
- **{spec["height"]}x{spec["width"]} px input.** Detail finer than the input size is lost, and the
  edge resizes its images with the same {spec["interpolation"]} interpolation as training.
- **Threshold** is set for >= 95 % sensitivity on validation; on new data
  sensitivity and specificity will drift, so re-check before relying on them.
- **Probabilities may not be calibrated:** read the output as a score to compare with
  the threshold {op["threshold"]:.4f}, not as a risk.
- The test set's class balance ({_pct(prevalence)} `{labels[1]}`) is not a clinical prevalence;
  predictive values computed from it do not transfer.
"""


def render_model_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    split: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    bundle_dir: str | Path | None = None,
) -> str:
    """The human-readable model card (Markdown) for a manifest.

    Args:
        manifest: From :func:`build_manifest`.
        evaluation: The run's ``evaluation.json``.
        split: The run's ``split.json`` (None: the Kermany data).
        config: The run's training config (``train_summary.json``), for the
            reproduce command of a run other than the default one.
        bundle_dir: Where the bundle is written (same use).
    """
    card = data_card(split)
    if card.key != "kermany" or manifest["training"]["architecture"] != "efficientnet-lite0":
        text = _generic_card(manifest, evaluation, card, split, config, bundle_dir)
    else:
        text = _kermany_card(manifest, evaluation, split, config, bundle_dir)
    section = ood_card_section(manifest, evaluation, card)
    return text.replace("\n## Data\n", f"\n{section}\n## Data\n", 1) if section else text


def ood_card_section(manifest: dict[str, Any], evaluation: dict[str, Any], card: DataCard) -> str:
    """``## Intended use and out-of-distribution check``: the method, its fit, its rates, the ages."""
    use = manifest.get("intended_use", {})
    ood = use.get("ood")
    ages = use.get("age_years")
    if not ood and not ages:
        return ""
    lines = ["## Intended use and out-of-distribution check", ""]
    if ood:
        features = manifest["output"]["features"]
        layers = ", ".join(
            f"`{name}` ({dim})" for name, dim in zip(features["layers"], features["dims"], strict=True)
        )
        by_backend = ood.get("by_backend") or {}
        backends = "; ".join(
            f"{name}: its own statistics (`{entry['file']}`, fitted on its features the same way), "
            f"threshold {entry['threshold']:.4f}, validation outside "
            f"{_pct(entry['validation_outside_share'])}"
            for name, entry in by_backend.items()
        )
        test = (evaluation.get("test") or {}).get("ood")
        lines += [
            "Every scan is also scored for how unlike the training images it is, from the same model run "
            "(no second inference): the model's `features` output is the global average of the feature map",
            f"at the end of each multi-block stage, {layers}. Per stage, the Mahalanobis distance to the",
            "training split under a Ledoit-Wolf shrinkage covariance, its logarithm standardised on the",
            "training split, summed over the stages (`edge_runtime/ood.py`). Early stages see intensity and",
            "texture (an inverted or non-radiograph image), later ones anatomy and scale (an adult chest).",
            "",
            f"- **Fitted on** the {ood['fitted_on']} (no augmentation; the patient-disjoint split the",
            "  model trained on), through the edge's ONNX Runtime backend.",
            f"- **Threshold {ood['threshold']:.4f}** = {ood['threshold_rule']} (rule fixed in issue #26",
            "  before any outside image was scored): at least 95 % of in-distribution validation images",
            "  pass, with room for a new site's shift. Above it a scan is outside the intended use.",
            f"- **Validation outside:** {_pct(ood['validation_outside_share'])} (ONNX Runtime)"
            + (f". Each backend quantizes with its own scales, so {backends}." if backends else "."),
        ]
        if test:
            lines.append(
                f"- **Official test split outside:** {_pct(test['outside_share'])} of {test['n']} images "
                "(reported only; nothing was chosen on it)."
            )
        measured = ood.get("measured_outside") or {}
        onnx = measured.get("onnxruntime")
        if onnx:
            names = {
                "nih_adult": "adult NIH ChestX-ray14 films",
                "rotated90": "the test split rotated 90 degrees",
                "inverted": "inverted",
                "flipped": "flipped left-right",
                "non_chest": "non-chest DICOM images (CT, MR, spine...)",
            }
            parts = ", ".join(f"{names.get(k, k)} {_pct(v['outside'])} (n={v['n']})" for k, v in onnx.items())
            lines.append(
                f"- **Images outside the intended use, flagged (ONNX Runtime):** {parts}. A flipped film "
                "is not caught (it looks like a chest to the model); LiteRT's own statistics flag the "
                "same images within a few tenths of a per cent (manifest `measured_outside`)."
            )
    if ages:
        reason = f": {card.age_reason}" if card.age_reason else ""
        lines += [
            f"- **Age:** `intended_use.age_years` = [{ages[0]:g}, {ages[1]:g}] years{reason}. The",
            "  runtime checks it against the patient's age where the DICOM header gives one.",
        ]
    return "\n".join(lines) + "\n"


def _kermany_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    split_record: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    bundle_dir: str | Path | None = None,
) -> str:
    """The card of the default bundle: EfficientNet-Lite0 on Kermany."""
    op = manifest["operating_point"]
    tr = manifest["training"]
    spec = manifest["preprocessing"]
    split = tr["split"]
    notes = "".join(f"\n- {note}." for note in (split_record or {}).get("notes") or [])
    return f"""# Model card: {manifest["name"]} {manifest["version"]}

> **NOT FOR DIAGNOSTIC USE.** A research and engineering demonstrator. It has
> not been cleared by any regulator, was trained on one hospital's paediatric
> images, and must not inform the care of any patient.

## What it is

- **Task:** probability that a frontal chest radiograph of a young child shows
  pneumonia (`labels` = `NORMAL`, `PNEUMONIA`).
{_architecture(manifest)}
- **Input:** `input`, float32 `[batch, 3, {spec["height"]}, {spec["width"]}]` NCHW, built by
  `edge_runtime.preprocess.preprocess` with the spec in `manifest.json`
  (stretch to {spec["height"]}x{spec["width"]} with area interpolation, 8-bit rounding,
  (x - 0.5) / 0.5, grey repeated on 3 channels).
- **Output:** `probabilities`, `[batch, 2]` (already softmaxed; activation `none`).
- **Decision:** {op["rule"]}, threshold **{op["threshold"]:.4f}** = the {op["method"]}.

## Intended use

Triage/demonstration on an edge device: frontal (PA/AP) chest radiographs
(CR, DX) of children aged 1-5 years. `intended_use` in the manifest lists
these so the runtime's intake policy can refuse other studies from DICOM headers.

**Out of scope:** adults and older children, lateral views, other body parts,
CT, any diagnostic or treatment decision, distinguishing bacterial from viral
pneumonia, any other finding (effusion, pneumothorax, tubes, nodules...).

## Data

{DATA_CITATION}

Images from the Guangzhou Women and Children's Medical Center, children aged
1-5. The copy used here was resized to 224x224 by a third party **without
keeping the aspect ratio**; the model therefore expects squashed images, which
is why the preprocessing stretches instead of letterboxing.

- Official train split, divided by patient (no child on both sides, stratified by label):
  train {split["train"]["images"]} images / {split["train"]["patients"]} patients
  ({split["train"]["NORMAL"]} NORMAL, {split["train"]["PNEUMONIA"]} PNEUMONIA), validation
  {split["validation"]["images"]} images / {split["validation"]["patients"]} patients
  ({split["validation"]["NORMAL"]} NORMAL, {split["validation"]["PNEUMONIA"]} PNEUMONIA).
- Official test split: 624 images (234 NORMAL, 390 PNEUMONIA), scored once at the end and
  never used to choose anything.{notes}

## Training

{_training_text(tr, config, spec, bundle_dir)}

{_metrics_text(manifest, evaluation, "official test", _SATURATION_NOTE)}

## Limitations

- **Paediatric only, one centre.** Trained and tested on children from one
  Guangzhou hospital; performance on adults, other hospitals, other detectors
  and other post-processing is unknown and likely lower.
- **{spec["height"]} px, squashed.** Fine detail is lost at {spec["height"]}x{spec["width"]}, and the
  training images were stretched to a square; letterboxed or cropped inputs differ from them.
- **Labels** are image-level diagnoses from the original study, not verified here;
  the original dataset contains duplicate images, and patient independence between
  its official train and test splits is not guaranteed (170 `personN` numbers of the
  test split also occur in the train split; whether they are the same children is unknown).
- **Threshold** is set for >= 95 % sensitivity on validation; on new data
  sensitivity and specificity will drift, so re-check before relying on them.
- {_calibration_text(manifest, op["threshold"])}
- The test set's class balance (62.5 % pneumonia) is not a clinical prevalence;
  predictive values computed from it do not transfer.
"""


def _calibration_text(manifest: dict[str, Any], threshold: float) -> str:
    """The card's sentence on what the published probability means."""
    cal = manifest.get("calibration")
    if not cal:
        return (
            f"**Probabilities are not calibrated.** The model is over-confident (the operating "
            f"threshold is {threshold:.4f}): read the output as a score to compare with the threshold, "
            "not as a risk."
        )
    test = cal.get("test_ece_10")
    test_text = f"; on the official test split it is {test:.3f} (INT8), " if test is not None else "; "
    return (
        f"**Probabilities are temperature-scaled** (T = {cal['temperature']:.3f}, fitted on the "
        f"validation split and folded into the classifier of every model file). Validation ECE "
        f"(15 bins) {cal['validation_ece_15']['after']:.3f}{test_text}the test images come from a "
        "later, shifted population, so read a probability as a calibrated score on data like the "
        "training set, and compare it with the threshold."
    )
