"""Few-step students: consistency distillation on the pool's states, and their K-step sampler.

A consistency student f(x_t, t) maps any state of the teacher's probability-flow ODE to the ODE's
end. It is parameterised as latent consistency models are, f = c_skip(t) x_t + c_out(t) x0(x_t, t)
with x0 read from the network's prediction, so that diffusers' ``LCMScheduler`` samples a saved
student in K steps with the same arithmetic as ``sample`` here (given ``sampler_timesteps``' K
timesteps: its own evenly spaced ones end the sampler at a large t). Training pairs come from the DKDM
pool: for a state x_t the teacher's deterministic (DDIM) step to s = t - skip gives x_s, and the
student is pulled towards its own output at (x_s, s) under a stop-gradient (improved consistency
training's target), with a pseudo-Huber distance. The teacher's forward is the one the pool
already pays for; nothing reads data.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .diffusion import Reverse, Schedule

#: LCMScheduler's ``original_inference_steps``: the student is trained on skips of T // GRID steps
#: and samples at K of the GRID timesteps T/GRID - 1, 2T/GRID - 1, ..., T - 1.
GRID = 50
#: LCMScheduler's boundary condition: c_skip = s^2 / ((10 t)^2 + s^2), s = SIGMA_DATA, so that f is
#: the identity at t = 0 and the network's x0 from t = 1 on.
TIMESTEP_SCALING, SIGMA_DATA = 10.0, 0.5
#: Where a consistency student's K timesteps after T - 1 lie (docs/few-step.md, digits, the same
#: 1,200-step students at each K): geometrically from 0.3 T down to 0.04 T for up to SPACED_MAX_STEPS
#: steps (999, 299, 119, 39: 0.75-1.37x the teacher's 100-step digits-FID where LCMScheduler's evenly
#: spaced 999, 759, 499, 259 scored 1.14-2.07x); over a wider range, 0.6 T to 0.02 T, for up to
#: WIDE_MAX_STEPS (eight: 999, 599, 339, 199, 119, 59, 39, 19, 0.71-1.46x where the even spacing
#: scored 0.80-1.81x, for a recall 0.01-0.09 lower); LCMScheduler's even spacing above (at twelve and
#: sixteen steps the wide range lost recall, 0.63-0.74, and did no better by FID).
SPACING, SPACED_MAX_STEPS, WIDE_SPACING, WIDE_MAX_STEPS = (0.3, 0.04), 4, (0.6, 0.02), 8
#: iCT's pseudo-Huber constant per square root of the sample's size (0.03 on 32x32 RGB).
HUBER_PER_SQRT_DIM = 0.00054


def sigma_power(steps: int) -> float:
    """The exponent p of the loss weight 1 / sigma_t^p for a student that samples in ``steps`` steps:
    1 for one step (its only timestep is T - 1), 2 for more, whose last steps sit at small t
    (docs/few-step.md, digits seed 0, 1 / 2 / 4 / 8 steps: p = 1: 17.6 / 14.7 / 13.1 / 9.5,
    p = 2: 24.8 / 14.2 / 11.7 / 8.4; the ddpm teacher, p = 1: 63 / 68 / 57 / 59, p = 2: 22.6 / 22.1 / 13.7 / 12.5)."""
    return 1.0 if steps == 1 else 2.0


def skip_steps(num_steps: int, grid: int = GRID) -> int:
    """Model steps between the two ends of one consistency pair."""
    return max(1, num_steps // grid)


def lcm_timesteps(steps: int, num_steps: int, grid: int = GRID) -> list[int]:
    """The K timesteps ``LCMScheduler.set_timesteps(K)`` picks: K evenly spaced indices into the GRID
    timesteps T/GRID - 1, 2T/GRID - 1, ..., T - 1, from the top down."""
    return [int(t) for t in _grid(num_steps, grid)[::-1][_even(steps, grid)]]


def sampler_timesteps(steps: int, num_steps: int, grid: int = GRID) -> list[int]:
    """The K timesteps a consistency student samples at: the top of the grid, then K - 1 grid
    timesteps geometrically spaced from SPACING[0] T down to SPACING[1] T (from SPACED_MAX_STEPS + 1
    steps up WIDE_SPACING's), each the grid timestep nearest its target, below the one before,
    leaving room for those after; from WIDE_MAX_STEPS + 1 steps up ``lcm_timesteps``."""
    points = _grid(num_steps, grid)
    if not 1 <= steps <= len(points):
        raise ValueError(f"{steps} steps from a grid of {len(points)}")
    if steps > WIDE_MAX_STEPS:
        return lcm_timesteps(steps, num_steps, grid)
    top, bottom = SPACING if steps <= SPACED_MAX_STEPS else WIDE_SPACING
    times = [int(points[-1])]
    targets = np.geomspace(top * num_steps, bottom * num_steps, steps - 1)
    for i, target in enumerate(targets):
        after = steps - 2 - i
        allowed = [p for j, p in enumerate(points) if j >= after and p < times[-1]]
        times.append(int(min(allowed, key=lambda p: abs(p - target))))
    return times


def timesteps_for(sampler: dict, steps: int, num_steps: int) -> list[int]:
    """The K timesteps a few-step student (``sampler``: its ``extra["sampler"]``) samples at: a matching
    generator LCMScheduler's evenly spaced ones on its cut schedule (it was trained at them), a
    consistency student ``sampler_timesteps``."""
    pick = lcm_timesteps if sampler.get("objective") == "matching" else sampler_timesteps
    return pick(steps, num_steps, int(sampler.get("grid", GRID)))


def _grid(num_steps: int, grid: int) -> np.ndarray:
    return np.arange(1, grid + 1) * (num_steps // grid) - 1


def _even(steps: int, grid: int) -> np.ndarray:
    return np.floor(np.linspace(0, grid, num=steps, endpoint=False)).astype(np.int64)


def boundary_scalings(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timesteps ``t``, shaped and typed to broadcast over ``like``."""
    s = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    shape = (-1, *([1] * (like.dim() - 1)))
    return c_skip.to(like.dtype).view(shape), c_out.to(like.dtype).view(shape)


def consistency_output(schedule: Schedule, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                       prediction: str, clip_x0: bool = False) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0 from a network's prediction (the sampler clamps x0 where the
    model clamps; training does not, so that the gradient reaches every value)."""
    x0 = schedule.eps_and_x0(pred, x_t, t, prediction)[1]
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    c_skip, c_out = boundary_scalings(t, x_t)
    return c_skip * x_t + c_out * x0


def teacher_ode_step(schedule: Schedule, target: Reverse, x_t: torch.Tensor, t: torch.Tensor,
                     s: torch.Tensor) -> torch.Tensor:
    """The teacher's DDIM step from t to s: its x0 (clamped where the teacher clamps) and the epsilon
    that x0 implies at (x_t, t), as guided-diffusion's ddim_sample takes it (diffusers' DDIMScheduler
    with use_clipped_model_output)."""
    return schedule.q_sample(target.x0, s, schedule.eps_from_x0(x_t, t, target.x0))


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample sqrt(||a - b||^2 + c^2) - c, c = HUBER_PER_SQRT_DIM * sqrt(values per sample)."""
    d = (a - b).flatten(1)
    c = HUBER_PER_SQRT_DIM * math.sqrt(d.shape[1])
    return (d.pow(2).sum(1) + c * c).sqrt() - c


def consistency_loss(schedule: Schedule, student_pred: torch.Tensor, target_pred: torch.Tensor,
                     x_t: torch.Tensor, t: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor,
                     prediction: str, power: float) -> dict[str, torch.Tensor]:
    """Per-sample terms: ``distance`` between f_theta(x_t, t) and the stop-gradient f(x_s, s), and
    ``loss``, the distance divided by sigma_t^power (``sigma_power``), sigma_t = sqrt(1 - alpha_bar_t).
    Predictions carry the sample's channels only (a learned variance's are dropped by the caller)."""
    online = consistency_output(schedule, student_pred, x_t, t, prediction)
    with torch.no_grad():
        target = consistency_output(schedule, target_pred, x_s, s, prediction)
    distance = pseudo_huber(online, target)
    # x0's error in units of the noise: through v, x0 at a small t moves by only sigma_t per unit of the
    # network's output, and every later step of the sampler inherits those t (docs/few-step.md)
    sigma = schedule._take(t, distance, "sqrt_one_minus_alphas_cumprod")[0]
    return {"distance": distance, "loss": distance / sigma ** power}


@torch.no_grad()
def sample(model, num: int, steps: int, generator=None, batch_size: int = 1024, progress=None,
           labels: torch.Tensor | None = None, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num`` samples of a consistency student in ``steps`` steps, as diffusers' LCMScheduler draws
    them: at each timestep x0 = f(x, t) (x0 clamped where the model clamps), then, but for the last,
    x = q(x_next | x0) with fresh noise. Returns (samples, labels)."""
    T = model.schedule.num_steps
    times = timesteps_for(model.extra.get("sampler", {}), steps, T)
    device = next(model.parameters(), torch.empty(0)).device
    if labels is None:
        labels = model.labels_for(num, generator, device)
    c = model.sample_shape[0]
    chunks = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        y = None if labels is None else labels[start:start + n].to(device)
        x = torch.randn((n, *model.sample_shape), generator=generator, device=device)
        for i, step in enumerate(times):
            t = torch.full((n,), step, device=device, dtype=torch.long)
            pred = model.output(x, t, y, guidance)[:, :c].float()
            x = consistency_output(model.schedule, pred, x, t, model.prediction, model.clip_x0)
            if i + 1 < len(times):
                noise = torch.randn(x.shape, generator=generator, device=device)
                x = model.schedule.q_sample(x, torch.full_like(t, times[i + 1]), noise)
            if progress is not None:
                progress.update(n)
        chunks.append(x.cpu())
    return torch.cat(chunks), None if labels is None else labels.cpu()
