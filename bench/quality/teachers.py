"""Digits teachers that dkdm did not train, for measuring defaults on teachers of other families.

The bundled teacher (``builtin:digits``) was trained by ``dkdm train`` and carries the digits
distillation defaults. A user's teacher carries nothing of the kind: this script trains one the way
a user of diffusers would, with diffusers' own scheduler, EMA and pipeline and a plain PyTorch
loop, on the same digits train split, and writes it as a ``DDPMPipeline`` directory:

- ``ddpm``: ``UNet2DModel`` (widths 32-64, 2 layers, attention at the second level, 1.0M
  parameters), linear betas, ``fixed_small`` variance, epsilon prediction, ``clip_sample``.
- ``dit``: a transformer teacher, ``dkdm train --model dit:...`` (diffusers' ``DiTTransformer2DModel``
  with DiT's adaLN-Zero initialisation; 1.4M parameters, patch 2, cosine, learned variance), so the
  defaults meet a teacher of a third family. 6,000 steps at batch 128, lr 1e-3: about 40 minutes on
  one core.

    python bench/quality/teachers.py --out /tmp/teachers            # trains what is missing
    dkdm distill --teacher /tmp/teachers/ddpm --out RUN             # what a user types
    dkdm evaluate --model /tmp/teachers/ddpm --reference digits     # its digits-FID

Deterministic for a seed on one CPU thread; about 15 minutes (ddpm) and 40 minutes (dit) on one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def train_ddpm(out: Path, steps: int, seed: int, progress: bool) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dkdm.data import Digits

    torch.manual_seed(seed)
    images = Digits("train").images
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                              prediction_type="epsilon", clip_sample=True)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in tqdm(range(steps), desc="ddpm teacher", disable=not progress):
        x0 = images[torch.randint(0, len(images), (128,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in unet.parameters())
    print(f"wrote {out}: DDPMPipeline, UNet2DModel {n:,} parameters, {steps} steps, {time.time() - t0:.0f} s",
          file=sys.stderr)


def train_dit(out: Path, steps: int, seed: int, progress: bool) -> None:
    """Trains in ``out``.partial (resumed if there) and renames it when done, so ``out`` is complete."""
    from dkdm.cli import main as dkdm

    t0 = time.time()
    part = out.with_name(out.name + ".partial")
    rc = dkdm(["train", "--data", "digits", "--model", "dit:patch=2,depth=4,width=128,heads=4", "--steps", str(steps),
               "--batch", "128", "--lr", "1e-3", "--ema", "0.999", "--warmup", "200", "--grad-clip", "0",
               "--seed", str(seed), "--out", str(part), "--no-report", "--ckpt-every", "500",
               *(("--resume",) if part.exists() else ()), *(() if progress else ("--no-progress",))])
    if rc:
        raise SystemExit(rc)
    part.rename(out)
    print(f"wrote {out}: dkdm DiT, {steps} steps, {time.time() - t0:.0f} s", file=sys.stderr)


#: each teacher with its training steps (--steps overrides)
TEACHERS = {"ddpm": (train_ddpm, 12000), "dit": (train_dit, 6000)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory holding one sub-directory per teacher")
    ap.add_argument("--only", nargs="*", choices=sorted(TEACHERS), help="teachers to train (default: all)")
    ap.add_argument("--steps", type=int, help="training steps (default: each teacher's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.out)
    for name in args.only or sorted(TEACHERS):
        if any((root / name / f).exists() for f in ("model_index.json", "dkdm_model.json")):
            print(f"{root / name} exists; skipped", file=sys.stderr)
            continue
        train, steps = TEACHERS[name]
        train(root / name, args.steps or steps, args.seed, not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
