"""Child of :func:`training.export.emulation.predict_emulated`: ``MODEL X.npy OUT.npy [NAME ...]``.

Without names it saves the first output to ``OUT.npy``; with names, those outputs to ``OUT``
as an ``.npz`` (one array per name), e.g. ``probabilities features``.

Runs one ONNX Runtime CPU session the way the edge does (one thread) and
prints the CPU features it saw, so a log shows that the emulation took.
Imports only numpy and onnxruntime: it runs under an instruction emulator.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

from edge_runtime.cpu import cpu_summary


def main(argv: list[str]) -> int:
    model, x_path, out_path, *names = argv
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.load(x_path)
    if names:
        runs = [session.run(names, {name: x[i : i + 8]}) for i in range(0, len(x), 8)]
        with open(out_path, "wb") as handle:
            np.savez(handle, **{n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)})
    else:
        outs = [session.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)]
        np.save(out_path, np.concatenate(outs))
    print(cpu_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
