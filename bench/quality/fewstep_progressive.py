"""The third few-step candidate of issue 27: progressive distillation from the DKDM student, data-free.

FEWSTEP.md section 3, in rounds: a student of N DDIM steps learns to land, in one step, where two
DDIM steps of the round's target model land (Salimans & Ho's x0 target, its truncated-SNR weight,
the student predicting v); N halves each round, from ``--start-steps`` / 2 down to K. The first
round's target model is the teacher, each later round's the previous round's student (frozen).
No data: each round's states come from a pool of the target model's own N-step chains, kept as
distill keeps its pool: prepared once by running ``--batch`` chains from noise and keeping every
state, then each step draws ``--batch`` entries, computes their two-step targets, writes the landed
states back and restarts the chains that reached the end from noise. The student starts from the
DKDM student's weights (``DiffusionModel.few_step_of``, predicting v).

``--steps`` is the whole budget, split evenly over the rounds; a step costs two target-model
forwards and the student's forward and backward per sample (a consistency step: one teacher
forward, the student's forward and backward and one more student forward). Scored as
docs/few-step.md scores: digits-FID, precision, recall of 1,437 samples at K DDIM steps, the seed's
noise, the raw weights (no EMA).

    python bench/quality/fewstep_progressive.py --student RUN --sampler-steps 4 --steps 1200 --out DIR [--teacher T]

Measured (docs/few-step.md, "Progressive distillation"): 4-step digits-FID 29.80 / 30.59 on the
bundled / ddpm teacher (seed 0) against consistency's 10.66 / 11.74 at the same budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def grid(n: int, T: int) -> list[int]:
    """The n timesteps of an n-step sampler, from the top: (k + 1) T / n - 1 for k = n - 1 .. 0."""
    return [(k + 1) * T // n - 1 for k in reversed(range(n))]


def ddim_x0(model, x, t: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """The model's x0 at (x, t), clamped where the model clamps (``clamp``: for sampling, not training)."""
    c = x.shape[1]
    x0 = model.schedule.eps_and_x0(model(x, t)[:, :c].float(), x, t, model.prediction)[1]
    return x0.clamp(-1, 1) if clamp and model.clip_x0 else x0


def ddim_to(schedule, x, x0, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The DDIM step from (x, t) with the given x0 to s (s < 0: x0 itself), as
    ``consistency.teacher_ode_step`` takes it: epsilon the one x0 implies at (x, t)."""
    x_s = schedule.q_sample(x0, s.clamp(min=0), schedule.eps_from_x0(x, t, x0))
    return torch.where((s < 0).view(-1, 1, 1, 1), x0, x_s)


def x0_target(schedule, x, t, x_s, s) -> torch.Tensor:
    """The x0 whose DDIM step from (x, t) lands on x_s at s (Salimans & Ho eq. 8; x_s itself at the end)."""
    ab = schedule.alphas_cumprod.to(x.device, torch.float64)
    a_t, a_s = ab[t].float().view(-1, 1, 1, 1), ab[s.clamp(min=0)].float().view(-1, 1, 1, 1)
    ratio = ((1 - a_s) / (1 - a_t)).sqrt()
    x0 = (x_s - ratio * x) / (a_s.sqrt() - ratio * a_t.sqrt())
    return torch.where((s < 0).view(-1, 1, 1, 1), x_s, x0)


@torch.no_grad()
def sample(model, n: int, num: int, seed: int) -> torch.Tensor:
    """``num`` samples of ``model`` in ``n`` DDIM steps, from the seed's noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num, *model.sample_shape), generator=g)
    times = grid(n, model.schedule.num_steps)
    for i, step in enumerate(times):
        t = torch.full((num,), step, dtype=torch.long)
        s = torch.full((num,), times[i + 1] if i + 1 < n else -1, dtype=torch.long)
        x = ddim_to(model.schedule, x, ddim_x0(model, x, t), t, s)
    return x


class ChainPool:
    """States of the target model's n-step chains: (x, k) with k the index of its next step."""

    def __init__(self, target, n: int, batch: int, g: torch.Generator):
        self.target, self.n, self.g = target, n, g
        self.times = torch.tensor(grid(2 * n, target.schedule.num_steps))  # the target model's 2n steps
        x = torch.randn((batch, *target.sample_shape), generator=g)
        xs, ks = [], []
        with torch.no_grad():
            for k in range(n):  # every state of ``batch`` chains: n x batch entries, spread over the steps
                xs.append(x), ks.append(torch.full((batch,), k))
                x = self.two_steps(x, torch.full((batch,), k))
        self.x, self.k = torch.cat(xs), torch.cat(ks)

    def t_of(self, k: torch.Tensor) -> torch.Tensor:
        return self.times[2 * k]  # the student's step k starts where the target's step 2k does

    def two_steps(self, x, k):
        """Where two DDIM steps of the target model take the states x at the student's step k."""
        for j in (2 * k, 2 * k + 1):
            t = self.times[j]
            s = torch.where(j + 1 < 2 * self.n, self.times[(j + 1).clamp(max=2 * self.n - 1)], torch.full_like(t, -1))
            x = ddim_to(self.target.schedule, x, ddim_x0(self.target, x, t), t, s)
        return x

    def draw(self, batch: int):
        """A batch (x, t, target x0) and the pool advanced: landed states written back, finished ones restarted."""
        idx = torch.randint(len(self.x), (batch,), generator=self.g)
        x, k = self.x[idx], self.k[idx]
        with torch.no_grad():
            landed = self.two_steps(x, k)
        t = self.t_of(k)
        s = torch.where(k + 1 < self.n, self.t_of((k + 1).clamp(max=self.n - 1)), torch.full_like(t, -1))
        target = x0_target(self.target.schedule, x, t, landed, s)
        done = k + 1 >= self.n
        self.x[idx] = torch.where(done.view(-1, 1, 1, 1), torch.randn(x.shape, generator=self.g), landed)
        self.k[idx] = torch.where(done, torch.zeros_like(k), k + 1)
        return x, t, target


def train_round(student, target, n: int, steps: int, batch: int, lr: float, g: torch.Generator, log) -> None:
    """One round: ``student`` learns n steps from two-step targets of ``target``."""
    pool = ChainPool(target, n, batch, g)
    opt = torch.optim.AdamW(student.net.parameters(), lr=lr, weight_decay=0.0)
    ab = student.schedule.alphas_cumprod.float()
    for step in range(1, steps + 1):
        x, t, x0_t = pool.draw(batch)
        x0 = ddim_x0(student, x, t, clamp=False)
        snr = ab[t] / (1 - ab[t])
        loss = (snr.clamp(min=1).view(-1, 1, 1, 1) * (x0 - x0_t) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.net.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        opt.step()
        if step % 50 == 0 or step == steps:
            print(json.dumps({"round_steps": n, "step": step, "loss": round(loss.item(), 6)}), file=log, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", required=True, help="a dkdm distill run or model directory (the DKDM student)")
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sampler-steps", type=int, default=4)
    ap.add_argument("--start-steps", type=int, default=64, help="the teacher's DDIM steps the first round halves")
    ap.add_argument("--steps", type=int, default=1200, help="student steps in all, split evenly over the rounds")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num", type=int, default=1437)
    a = ap.parse_args(argv)

    from dkdm.evaluation import score
    from dkdm.formats import load_model
    from dkdm.model import DiffusionModel

    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    teacher = load_model(a.teacher).eval().requires_grad_(False)
    student = DiffusionModel.few_step_of(load_model(a.student), a.sampler_steps).float().train()
    rounds = []
    n = a.start_steps // 2
    while n >= a.sampler_steps:
        rounds.append(n)
        n //= 2
    per_round = a.steps // len(rounds)
    a.out.mkdir(parents=True, exist_ok=True)
    log = (a.out / "log.jsonl").open("a")
    print(f"progressive distillation: rounds of {rounds} steps, {per_round} steps each at batch {a.batch} "
          f"(2 target-model forwards + the student's forward and backward per sample)", flush=True)
    t0, target = time.time(), teacher
    for n in rounds:
        train_round(student, target, n, per_round, a.batch, a.lr, g, log)
        target = copy.deepcopy(student).eval().requires_grad_(False)
        m = score(sample(target, n, a.num, a.seed), "digits")
        rec = {"round_steps": n, "wall_s": round(time.time() - t0, 1),
               **{k: m[k] for k in ("digits_fid", "precision", "recall")}}
        print(json.dumps(rec), file=log, flush=True)
        print(rec, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
