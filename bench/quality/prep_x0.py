"""How good are the x0 that sampled pool preparation starts from? digits-FID of the digits
teacher's ancestral samples at K respaced steps (K = --prep-steps), against its 100-step score
(the grid's evaluation setting). One thread, 1,437 samples, the evaluation's digits-FID.

    python bench/quality/prep_x0.py --steps 10 25 100 --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    from dkdm.metrics.digits import digits_metrics
    from dkdm.formats import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--num", type=int, default=1437)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = load_model("builtin:digits").eval()
    print("| K | " + " | ".join(f"seed {s}" for s in a.seeds) + " | wall per seed |")
    print("|---|" + "---|" * (len(a.seeds) + 1))
    for k in a.steps:
        fids, t0 = [], time.time()
        for s in a.seeds:
            x = teacher.sample(a.num, k, torch.Generator().manual_seed(s))
            fids.append(digits_metrics(x)["digits_fid"])
        print(f"| {k} | " + " | ".join(f"{f:.2f}" for f in fids) + f" | {(time.time() - t0) / len(a.seeds):.0f} s |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
