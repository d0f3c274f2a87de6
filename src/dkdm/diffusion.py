"""The mathematics of Gaussian diffusion, in one place.

Everything that knows what a beta schedule, a forward posterior or a reverse step is lives here:
the pools, the objective, the trainer and the samplers only call into it. Schedules are held in
float64 and cast per step (as improved-DDPM and the DKDM authors' code do), so results agree with
their float64 reference to float32 rounding.

Timesteps here are *model* indices 0 .. T-1: index t is the step from x_{t+1} to x_t in the
1-based notation of the papers, and the index the network is conditioned on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .choices import PREDICTIONS, SCHEDULES, VARIANCES


def _alpha_bar_betas(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    betas = []
    for i in range(num_steps):
        t1, t2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def respaced_times(num_steps: int, steps: int) -> np.ndarray:
    """The model times an even respacing of ``num_steps`` into ``steps`` keeps (ascending, from 0)."""
    return np.unique(np.round(np.linspace(0, num_steps - 1, steps)).astype(np.int64))


def make_betas(
    name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """Named beta schedules as improved-DDPM / diffusers define them (float64).

    ``linear`` without explicit endpoints scales DDPM's (1e-4, 0.02) by 1000/T, so a 100-step
    linear schedule covers the same noise range as a 1000-step one (improved-DDPM's convention);
    the last beta is capped at 0.999 so very short schedules stay well defined.
    """
    if num_steps < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {num_steps}")
    if name == "cosine":
        return _alpha_bar_betas(
            num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    if name == "linear":
        scale = 1000.0 / num_steps
        start = beta_start if beta_start is not None else scale * 1e-4
        end = beta_end if beta_end is not None else min(scale * 0.02, 0.999)
        return np.linspace(start, end, num_steps, dtype=np.float64)
    if name == "scaled_linear":
        start = beta_start if beta_start is not None else 0.00085
        end = beta_end if beta_end is not None else 0.012
        return np.linspace(start**0.5, end**0.5, num_steps, dtype=np.float64) ** 2
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


_DIFFUSERS_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
}


class Reverse:
    """A model's (or the true posterior's) reverse-step distribution at (x_t, t).

    ``variance`` may be given as None: it is then exp(log_variance), computed when read (training
    reads only the log-variance, so a step does not pay for it; not kept, so that a step replayed
    into the same tensors never returns a stale variance).
    """

    FIELDS = ("eps", "x0", "mean", "variance", "log_variance")  # what a copy of a target carries

    def __init__(self, eps: torch.Tensor, x0: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor | None,
                 log_variance: torch.Tensor):
        self.eps, self.x0, self.mean, self.log_variance = eps, x0, mean, log_variance
        self._variance = variance

    @property
    def variance(self) -> torch.Tensor:
        return torch.exp(self.log_variance) if self._variance is None else self._variance


@dataclass
class TrainingBatch:
    """What every data source hands the trainer: inputs, model timesteps, and the target step."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: Reverse | None  # None for a source whose loss calls the teacher itself (matching.py)
    meta: dict = field(default_factory=dict)
    y: torch.Tensor | None = None  # class labels of a class-conditional model

    def first_nonfinite(self, output: torch.Tensor) -> str:
        """Which tensor of a step on this batch went NaN/inf first, in the order data flows: the
        input, the teacher's target, the student's ``output``."""
        target = self.target
        targets = () if target is None else (("the teacher's epsilon", target.eps), ("the teacher's mean", target.mean),
                                             ("the teacher's log-variance", target.log_variance))
        for name, tensor in (("the input x_t (for a pool: the teacher's previous step)", self.x_t), *targets,
                             ("the student's output", output)):
            bad = ~torch.isfinite(tensor.flatten(1)).all(1)
            if bool(bad.any()):
                return f"{name} is not finite at t={self.t[bad][:4].tolist()}"
        return "the loss alone is not finite (overflow)"


class Schedule:
    """A discrete DDPM noise schedule and every quantity derived from it."""

    def __init__(self, betas, config: dict | None = None):
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if b.dim() != 1 or len(b) < 2:
            raise ValueError("betas must be a 1-D sequence of at least 2 values")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.config = dict(config) if config else {"betas": b.tolist()}
        self.betas = b
        self.num_steps = len(b)
        alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = b * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(b)
        large = torch.cat([self.posterior_variance[1:2], b[1:]])
        self.fixed_large_variance = large
        self.fixed_large_log_variance = torch.log(large)

        # a learned-range log-variance f log b + (1 - f) log btilde with f = (v + 1) / 2 is
        # center + v * radius: two tables instead of five operations per step
        self.learned_log_variance_center = (self.log_betas + self.posterior_log_variance_clipped) / 2
        self.learned_log_variance_radius = (self.log_betas - self.posterior_log_variance_clipped) / 2

        self._device_copies: dict[tuple, torch.Tensor] = {}

    def _take(self, t: torch.Tensor, like: torch.Tensor, *names: str) -> tuple[torch.Tensor, ...]:
        """self.<name>[t] for each name (float64 tables) in like's dtype, shaped to broadcast over like.

        The tables are stacked, cast and copied to t's device once and kept there (casting then
        gathering gives the same values as gathering then casting), so a call is one gather: a
        copy per call would make every training step wait for the device, and a gather or cast
        per table would be one more kernel launch each.
        """
        key = (names, t.device, like.dtype)
        table = self._device_copies.get(key)
        if table is None:
            table = torch.stack([getattr(self, n) for n in names]).to(t.device, like.dtype)
            self._device_copies[key] = table
        rows = table.index_select(1, t)
        shape = (-1, *([1] * (like.dim() - 1)))
        return tuple(rows[i].view(shape) for i in range(len(names)))

    # construction -------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str, num_steps: int, **kw) -> "Schedule":
        betas = make_betas(name, num_steps, **kw)
        return cls(betas, {"schedule": name, "num_steps": num_steps, **kw})

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """Inverse of ``self.config``: a named schedule or explicit betas."""
        if "betas" in config:
            return cls(config["betas"], config)
        kw = {k: config[k] for k in ("beta_start", "beta_end") if config.get(k) is not None}
        return cls.named(config["schedule"], int(config["num_steps"]), **kw)

    @classmethod
    def from_diffusers(cls, scheduler_config: dict) -> "Schedule":
        """Read the schedule of a diffusers DDPM-family scheduler config."""
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        trained = scheduler_config.get("trained_betas")
        if trained is not None:
            return cls(trained)
        kind = scheduler_config.get("beta_schedule", "linear")
        if kind not in _DIFFUSERS_SCHEDULES:
            raise ValueError(
                f"unsupported diffusers beta_schedule {kind!r}; "
                f"supported: {', '.join(_DIFFUSERS_SCHEDULES)}"
            )
        name = _DIFFUSERS_SCHEDULES[kind]
        if name == "cosine":
            return cls.named("cosine", steps)
        return cls.named(
            name,
            steps,
            beta_start=float(scheduler_config.get("beta_start", 0.0001)),
            beta_end=float(scheduler_config.get("beta_end", 0.02)),
        )

    def describe(self) -> str:
        """e.g. "cosine, 1000 steps, beta 4.13e-05..0.999": what an error about a schedule names."""
        kind = self.config.get("schedule", "custom")
        return f"{kind}, {self.num_steps} steps, beta {float(self.betas[0]):.3g}..{float(self.betas[-1]):.3g}"

    def to_diffusers(self) -> dict:
        """The diffusers DDPMScheduler arguments that reproduce this schedule."""
        cfg = self.config
        if cfg.get("schedule") == "cosine":
            return {"num_train_timesteps": self.num_steps, "beta_schedule": "squaredcos_cap_v2"}
        if cfg.get("schedule") in ("linear", "scaled_linear"):
            b = make_betas(cfg["schedule"], self.num_steps, cfg.get("beta_start"), cfg.get("beta_end"))
            return {
                "num_train_timesteps": self.num_steps,
                "beta_schedule": cfg["schedule"],
                "beta_start": float(b[0]) if cfg["schedule"] == "linear" else cfg.get("beta_start", 0.00085),
                "beta_end": float(b[-1]) if cfg["schedule"] == "linear" else cfg.get("beta_end", 0.012),
            }
        return {"num_train_timesteps": self.num_steps, "trained_betas": self.betas.tolist()}

    def respace(self, num_steps: int) -> tuple["Schedule", torch.Tensor]:
        """An evenly respaced schedule with the same alpha-bar at the kept steps.

        Returns the new schedule and the map from its indices to this schedule's model indices
        (the network is still conditioned on the original timesteps).
        """
        if not 2 <= num_steps <= self.num_steps:
            raise ValueError(f"sampling steps must be in 2..{self.num_steps}, got {num_steps}")
        keep = respaced_times(self.num_steps, num_steps)
        abar = self.alphas_cumprod.numpy()[keep]
        prev = np.concatenate([[1.0], abar[:-1]])
        betas = 1.0 - abar / prev
        return Schedule(betas), torch.as_tensor(keep)

    # forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._take(t, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return torch.addcmul(a * x0, s, noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Reverse:
        """The forward posterior q(x_{t-1} | x_t, x0): the target of data-based training."""
        c1, c2, var, log_var, r, rm1 = self._take(
            t, x_t, "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
            "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")
        mean = torch.addcmul(c1 * x0, c2, x_t)
        eps = _eps_from_x0(x_t, x0, r, rm1)
        return Reverse(eps=eps, x0=x0, mean=mean, variance=var.expand_as(x_t), log_variance=log_var.expand_as(x_t))

    # conversions --------------------------------------------------------------------------
    def x0_from_eps(self, x_t, t, eps):
        return _x0_from_eps(x_t, eps, *self._take(t, x_t, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))

    def eps_from_x0(self, x_t, t, x0):
        return _eps_from_x0(x_t, x0, *self._take(t, x_t, "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))

    def eps_and_x0(self, pred, x_t, t, prediction: str):
        """A model's epsilon and x0 from its prediction (epsilon, v or x0), before any clamping."""
        return _eps_and_x0(pred, x_t, prediction, *self._take(t, x_t, *_PREDICTION_TABLES[_checked(prediction)]))

    def v_target(self, x0, t, eps):
        a, s = self._take(t, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return a * eps - s * x0

    def target(self, prediction: str, x0, t, eps):
        """What a denoiser predicting ``prediction`` (epsilon, v or x0) learns for x_t = q_sample(x0, t, eps)."""
        prediction = _checked(prediction)
        return eps if prediction == "epsilon" else x0 if prediction == "sample" else self.v_target(x0, t, eps)

    # reverse process ----------------------------------------------------------------------
    def reverse(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prediction: str = "epsilon",
        variance: str = "learned_range",
        clip_x0: bool = False,
    ) -> Reverse:
        """A model's reverse-step distribution p(x_{t-1} | x_t) from its raw output.

        ``output`` has C channels (fixed variance) or 2C (learned range: prediction, then the
        interpolation value v in [-1, 1]) along dim 1. ``eps`` is the model's own prediction;
        ``x0`` and ``mean`` use the clamped x0 when ``clip_x0`` (as the teacher's step does).
        Every coefficient of the step comes from one gather.
        """
        if variance not in _VARIANCE_TABLES:
            raise ValueError(f"unknown variance type {variance!r}; choose one of {VARIANCES}")
        channels = x_t.shape[1] * (2 if variance == "learned_range" else 1)
        if output.shape[1] != channels:
            kind = "learned-variance" if variance == "learned_range" else "fixed-variance"
            raise ValueError(f"a {kind} model must output {channels} channels, got {output.shape[1]}")
        va, vb, p1, p2, c1, c2 = self._take(
            t, x_t, *_VARIANCE_TABLES[variance], *_PREDICTION_TABLES[_checked(prediction)],
            "posterior_mean_coef1", "posterior_mean_coef2")
        if variance == "learned_range":
            pred, v = output.chunk(2, dim=1)
            log_var, var = torch.addcmul(va, vb, v), None
        else:
            pred = output
            var, log_var = va.expand_as(x_t), vb.expand_as(x_t)
        eps, x0 = _eps_and_x0(pred, x_t, prediction, p1, p2)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = torch.addcmul(c1 * x0, c2, x_t)
        return Reverse(eps=eps, x0=x0, mean=mean, variance=var, log_variance=log_var)


#: the tables a reverse step reads, by variance type (two each) and by prediction type (two each)
_VARIANCE_TABLES = {
    "learned_range": ("learned_log_variance_center", "learned_log_variance_radius"),
    "fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
    "fixed_large": ("fixed_large_variance", "fixed_large_log_variance"),
}
_PREDICTION_TABLES = {
    "epsilon": ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"),
    "sample": ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"),
    "v_prediction": ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"),
}


def _checked(prediction: str) -> str:
    if prediction not in _PREDICTION_TABLES:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def _x0_from_eps(x_t, eps, sqrt_recip, sqrt_recipm1):
    # two products and a difference, rounded as improved-DDPM rounds them: near t = T both products
    # are ~1e3 times x0, so a fused multiply-add would move x0 by a float32 ulp of theirs
    return sqrt_recip * x_t - sqrt_recipm1 * eps


def _eps_from_x0(x_t, x0, sqrt_recip, sqrt_recipm1):
    return (sqrt_recip * x_t - x0) / sqrt_recipm1


def _eps_and_x0(pred, x_t, prediction, c1, c2):
    """epsilon and x0 from a prediction, given the two coefficients _PREDICTION_TABLES names for it."""
    if prediction == "epsilon":
        return pred, _x0_from_eps(x_t, pred, c1, c2)
    if prediction == "sample":
        return _eps_from_x0(x_t, pred, c1, c2), pred
    return torch.addcmul(c1 * pred, c2, x_t), torch.addcmul(c1 * x_t, c2, pred, value=-1)  # v: a v + s x, a x - s v


def reverse_sample(step: Reverse, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_{t-1} from a reverse step; no noise is added at t = 0."""
    nonzero = (t != 0).view(-1, *([1] * (step.mean.dim() - 1)))
    return torch.where(nonzero, step.mean + torch.exp(0.5 * step.log_variance) * noise, step.mean)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def kl_bits(p: Reverse, q: Reverse) -> torch.Tensor:
    """Per-sample KL(p || q) averaged over elements, in bits."""
    kl = normal_kl(p.mean, p.log_variance, q.mean, q.log_variance)
    return kl.flatten(1).mean(1) / math.log(2.0)
