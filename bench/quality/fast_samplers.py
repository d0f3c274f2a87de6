"""diffusers' fast schedulers on the digits teacher, with and without its x0 clipping.

The teacher was trained and is sampled with x0 clipped to [-1, 1]. DDIM reads that from
``clip_sample``; DPM-Solver has no such flag and clips only through ``thresholding`` (at
``sample_max_value`` 1 the same operation), which is why written pipelines carry both. digits-FID
on 1,437 samples, one thread. diffusers' DPM-Solver keeps only the first 3 output channels of a
learned-variance model, so this script gives it the epsilon channels itself (the 1-channel digits
teacher cannot go through DDPMPipeline with DPM-Solver).

    python bench/quality/fast_samplers.py --steps 25 --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from dkdm.metrics.digits import digits_metrics
    from dkdm.formats import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num", type=int, default=1437)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = load_model("builtin:digits").eval()
    channels = teacher.sample_shape[0]
    cfg = teacher.schedule.to_diffusers()
    schedulers = {
        "DDIM, clip_sample": lambda: DDIMScheduler(**cfg, clip_sample=True),
        "DPM-Solver++ 2M, no clipping": lambda: DPMSolverMultistepScheduler(**cfg),
        "DPM-Solver++ 2M, thresholding at 1": lambda: DPMSolverMultistepScheduler(**cfg, thresholding=True,
                                                                                  sample_max_value=1.0),
    }
    print(f"| scheduler ({a.steps} steps) | " + " | ".join(f"seed {s}" for s in a.seeds) + " |")
    print("|---|" + "---|" * len(a.seeds))
    for name, make in schedulers.items():
        fids = []
        for seed in a.seeds:
            sched, g = make(), torch.Generator().manual_seed(seed)
            sched.set_timesteps(a.steps)
            x = torch.randn(a.num, *teacher.sample_shape, generator=g) * sched.init_noise_sigma
            with torch.inference_mode():
                for t in sched.timesteps:
                    eps = teacher(x, torch.full((a.num,), int(t)))[:, :channels]
                    x = sched.step(eps, t, x, generator=g).prev_sample
            fids.append(digits_metrics(x.clamp(-1, 1))["digits_fid"])
        print(f"| {name} | " + " | ".join(f"{f:.2f}" for f in fids) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
