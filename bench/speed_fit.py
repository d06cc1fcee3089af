"""Protection time only, in one run: the classic error-minimizing loop vs SALM's default fit.

``PYTHONPATH=. OMP_NUM_THREADS=1 python bench/speed_fit.py [DATASET]``: the wall time of
``bench.speed.classic_em`` and of ``SALM(seed=0).fit`` (mask, rounds, the perturbation of every
image) on the train split, one thread, no victim (``python -m bench speed`` adds the victims).
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from bench.speed import classic_em, train_tensors
from salm_fast.data import load_dataset
from salm_fast.methods import SALM


def main(dataset: str = "../shared/data/medmnist/pneumoniamnist.npz") -> dict:
    torch.set_num_threads(1)
    ds = load_dataset(dataset)
    _, x, y = train_tensors(ds)
    out: dict = {"dataset": dataset, "n_train": len(x), "load_start": os.getloadavg()[0]}
    t = time.perf_counter()
    _, out["classic_rounds"] = classic_em(x, y, ds.n_classes, seed=0)
    out["classic_s"] = time.perf_counter() - t
    t = time.perf_counter()
    p = SALM(seed=0).fit(x, y, ds.n_classes)
    p.delta  # every image's perturbation, as the classic loop makes it
    out["salm_s"] = time.perf_counter() - t
    out["salm_rounds"] = p.info["rounds"]
    out["load_end"] = os.getloadavg()[0]
    out["speedup"] = out["classic_s"] / out["salm_s"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:2])))
