"""Embeds texts with RETSim (``unisim.TextSim``) in an interpreter that has ``unisim``.

Run by ``bench.retsim`` as a script (``python _retsim_worker.py IN.json OUT.npy``) so that
``unisim`` and its ONNX runtime need not live in twinstream's environment.
"""

import json
import sys

import numpy as np


def main(source: str, target: str) -> None:
    from unisim import TextSim

    with open(source, encoding="utf-8") as handle:
        texts = json.load(handle)
    model = TextSim(use_accelerator=False, verbose=0)
    vectors = np.asarray(model.embed(texts), dtype=np.float32)
    np.save(target, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
