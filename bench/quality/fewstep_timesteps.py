"""A consistency student's K timesteps: LCMScheduler's evenly spaced ones against dkdm's rule.

A trained consistency student maps any grid timestep to the ODE's end, so which K of them its
sampler visits is a choice made after training. This script scores one or more few-step students
(run or model directories) at K steps with LCMScheduler's spacing (999, 759, 499, 259 for K = 4 of
1,000), with ``consistency.sampler_timesteps`` (dkdm's rule: 999, 299, 119, 39) and with any
``--custom`` list, each from the same noise: digits-FID, precision and recall of 1,437 samples,
one thread. The seed is the run's own (its run.json), as its report draws.

    python bench/quality/fewstep_timesteps.py RUN [RUN ...] --steps 2 3 4 8 --custom 999,399,159,39
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def score_at(model, steps: int, times: list[int], seed: int, num: int) -> dict:
    """Digits metrics of ``num`` samples drawn at ``times`` (the sampler's timesteps replaced)."""
    from dkdm import consistency, evaluation

    kept = consistency.timesteps_for
    consistency.timesteps_for = lambda sampler, k, T: list(times)
    try:
        samples = evaluation.draw(model, num, steps, seed, progress=False)
    finally:
        consistency.timesteps_for = kept
    return evaluation.score(samples, "digits")


def main(argv=None) -> int:
    from dkdm.consistency import lcm_timesteps, sampler_timesteps
    from dkdm.formats import load_model
    from dkdm.rundir import saved_setting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[4])
    ap.add_argument("--custom", nargs="*", default=[], help="timestep lists, comma-separated, from the top down")
    ap.add_argument("--num", type=int, default=1437)
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for run in a.runs:
        model = load_model(run).eval()
        sampler, T = model.extra["sampler"], model.schedule.num_steps
        seed = int(saved_setting(run, "seed", 0))
        for k in a.steps:
            grid = int(sampler["grid"])
            spacings = {"LCMScheduler": lcm_timesteps(k, T, grid), "dkdm": sampler_timesteps(k, T, grid),
                        **{c: [int(t) for t in c.split(",")] for c in a.custom if len(c.split(",")) == k}}
            for name, times in spacings.items():
                m = score_at(model, k, times, seed, a.num)
                row = {"run": run, "seed": seed, "steps": k, "spacing": name, "timesteps": times,
                       **{key: m[key] for key in ("digits_fid", "precision", "recall")}}
                print(f"{run} seed {seed} K={k} {name:>12} {times}: digits-FID {m['digits_fid']:.2f} "
                      f"P {m['precision']:.3f} R {m['recall']:.3f}", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
