"""PyTorch ``state_dict`` -> ``.npz`` of numpy arrays, for the Keras model in ``.venv-keras``.

Why a separate step: ``.venv-keras`` (``training/keras_env.sh``) holds TensorFlow and Keras but
deliberately no torch (it would add ~1 GB and a second framework to resolve against TensorFlow's
pins), and a ``.pth`` file is a torch pickle that only torch reads. So this module runs in the
MAIN environment, where torch is, and writes every tensor as a plain float array under its
PyTorch name (``_blocks.3._expand_conv.weight``, ``_bn0.running_var``, ...), unchanged in layout
(OIHW kernels, ``(out, in)`` dense weights): the Keras side
(:func:`training.keras.efficientnet_lite.load_ported_weights`) does the transposes and checks
that every array is used.

BatchNorm's ``num_batches_tracked`` counters are left out: they only count training updates,
inference never reads them and Keras's BatchNormalization (a fixed momentum) has no such weight.

    .venv/bin/python -m training.keras.port_weights \\
        --weights ../shared/data/weights/efficientnet-lite0-57934424.pth --out /tmp/lite0.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.model.models import _read_state_dict

__all__ = ["port_state_dict", "state_dict_arrays"]

#: Buffers with no Keras counterpart (see the module docstring).
SKIPPED_SUFFIXES = (".num_batches_tracked",)


def state_dict_arrays(weights: Path) -> dict[str, np.ndarray]:
    """The float tensors of a ``state_dict`` file (bare, or inside a checkpoint) as numpy arrays.

    Raises:
        ValueError: the file is not a PyTorch ``state_dict`` (see ``training.model.models``).
    """
    state = _read_state_dict(weights)
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32)
        for name, tensor in state.items()
        if not name.endswith(SKIPPED_SUFFIXES)
    }


def port_state_dict(weights: Path, out: Path) -> int:
    """Write ``weights``' tensors to the ``.npz`` file ``out``; returns how many were written."""
    arrays = state_dict_arrays(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(handle, **arrays)
    return len(arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.keras.port_weights",
        description="Write a PyTorch state_dict's tensors to an .npz (PyTorch names and layouts).",
    )
    parser.add_argument("--weights", type=Path, required=True, help="the .pth state_dict or checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    count = port_state_dict(args.weights, args.out)
    print(f"{count} arrays from {args.weights} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
