"""Few-step students by distribution matching: a generator, a fake score, the teacher's score, no data.

The DKDM student becomes a K-step generator G: read as a denoiser, it maps pure noise z taken as
the state at t* (the step whose noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) is
``SIGMA_INIT``, where SiD and DMD2 start their generators) to x0, and for K > 1 re-noises that x0 to
the next of its K timesteps and denoises again. It is saved as a consistency-form student on the
teacher's schedule cut at t* (grid t* + 1), so that ``consistency.sample`` and diffusers'
``LCMScheduler`` draw it unchanged.

Training (DMD without its regression and GAN terms): a batch is G's own input at its last step, the
sample of its first K - 1 steps re-noised (``MatchingSource``; training one of the K steps at random,
DMD2's backward simulation, lost quality on digits, its fake score following a mixture of the K
steps' outputs: docs/few-step.md); G's output x_g is noised to x_t at
t ~ U[2% of T, t*], and its gradient is g = (x0_fake - x0_teacher) / mean |x_g - x0_teacher| per
sample, the KL between G's distribution and the teacher's pushed down through both scores. The fake
score, a second copy of the DKDM student, follows G's distribution with the denoising loss on the
same x_t, one update per G update, from the one forward whose output (without gradient) gave x0_fake
(DMD2 draws the fake score's noisy samples apart, over all of T: a second forward; ``fake_updates``
> 1 steps it that many times per G update, the first ones on G's samples noised apart, as DMD2's
two time-scale rule does with five). DMD's regression term, data-free (``regression`` > 0,
``--ode-regression``): a bank of inputs of G's last step (noise for one step; for K > 1 the
teacher's own samples re-noised to that step), drawn once at the start, each paired with the
teacher's deterministic (DDIM) endpoint from it in ``ODE_STEPS`` steps; every batch carries a quarter
more rows from the bank, whose x0 is pulled to its pair's endpoint by mean squared error (DMD's
LPIPS is trained on ImageNet data). Each G step costs
one teacher forward per sample, one fake-score forward and backward (and K - 1 generator forwards
without gradient), and no pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .consistency import consistency_output, lcm_timesteps
from .diffusion import Schedule, TrainingBatch

#: The generator's first timestep: noise-to-signal ratio 2.5 (alpha_bar 0.138; t = 756 of the cosine
#: 1000-step schedule, 440 of DDPM's linear one).
SIGMA_INIT = 2.5
#: The teacher's and the fake score's x0 are compared at t from this fraction of T up to t* (DMD's
#: lower end; above t*, noisier than the generator's own input, DDPM's linear schedule spends half
#: its steps, and there the scores' x0 said nothing: bench/quality/fewstep_dmd.py --t-max, docs/few-step.md).
T_MIN = 0.02
#: AdamW's betas for the generator (``TrainConfig.adam_betas``) and the fake score: no momentum, each
#: chases the other as it moves.
BETAS = (0.0, 0.99)
#: ``--ode-regression``: the teacher's DDIM steps from a bank state to its endpoint, the bank's size,
#: and a batch's share of extra rows from it (batch // REGRESSION_SHARE).
ODE_STEPS, REGRESSION_BANK, REGRESSION_SHARE = 10, 2048, 4
#: The teacher's DDIM steps for the samples that the bank's inputs of a K > 1 generator re-noise (the
#: bundled teacher's DDIM with clipping: 9.88 digits-FID at 8 steps, docs/few-step.md).
SAMPLE_STEPS = 20


def first_timestep(schedule: Schedule, sigma: float = SIGMA_INIT) -> int:
    """The timestep whose noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) is nearest ``sigma``."""
    ab = schedule.alphas_cumprod
    return int((((1 - ab) / ab).sqrt() - sigma).abs().argmin())


def generator_schedule(schedule: Schedule, sigma: float = SIGMA_INIT) -> Schedule:
    """The teacher's schedule cut after t*: a K-step sampler on it (LCMScheduler's, grid = its length)
    takes t* first, where noise is the generator's input."""
    return Schedule(schedule.betas[: first_timestep(schedule, sigma) + 1])


def generator_x0(schedule: Schedule, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """G's sample from its epsilon prediction at (x, t): the consistency form's output (x0 at t > 0)."""
    return consistency_output(schedule, pred, x, t, "epsilon")


def matching_gradient(x_g: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's gradient for G's samples: (fake - real) / mean |x_g - real|, per sample."""
    dims = tuple(range(1, x_g.dim()))
    scale = (x_g - real_x0).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    return (fake_x0 - real_x0) / scale


def matching_loss(x_g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per sample 0.5 mean (x_g - stopgrad(x_g - grad))^2: its gradient in x_g is grad / values per sample."""
    return 0.5 * (x_g - (x_g - grad).detach()).pow(2).flatten(1).mean(1)


def with_regression(loss: torch.Tensor, square: torch.Tensor, x0: torch.Tensor, target: torch.Tensor,
                    weight: float) -> dict[str, torch.Tensor]:
    """Per-row terms of a batch of n matching rows (their ``loss`` and ``square``) and r regression
    rows (G's ``x0``, the teacher's endpoints ``target``), scaled so that their mean over all n + r
    rows is matching's mean plus ``weight`` times the regression's mean squared error: ``mse`` the
    matching rows' mean square of the gradient, ``vb`` the regression rows' squared error."""
    n, r = len(loss), len(target)
    dist = (x0 - target).pow(2).flatten(1).mean(1)
    zn, zr = torch.zeros_like(loss), torch.zeros_like(dist)
    a, b = (n + r) / n, (n + r) / r
    return {"loss": torch.cat([a * loss, b * weight * dist]), "mse": torch.cat([a * square, zr]),
            "vb": torch.cat([zn, b * dist])}


class MatchingSource:
    """G's inputs (the trainer's batches) and the two scores that judge its outputs.

    ``generator`` is the run's student (its plain network runs the backward simulation without
    gradient); ``fake`` is the fake score, stepped here with its own optimizer on each batch of G's
    samples (``judge``). Its weights, moments, random generator (seeded per process: ``seed``) and the
    teacher-forward count are this source's state, kept per process like a pool shard (each
    process draws its own samples, and its fake score follows them)."""

    def __init__(self, generator, teacher, fake, batch: int, lr: float, device=None, seed: int = 0,
                 fake_updates: int = 1, regression: float = 0.0):
        self.generator, self.teacher, self.fake = generator, teacher, fake
        self.fake_updates, self.regression = int(fake_updates), float(regression)
        self.rows = max(1, int(batch) // REGRESSION_SHARE) if self.regression else 0
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None  # drawn at the first batch
        self.batch, self.device = int(batch), device or torch.device("cpu")
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        g_schedule = generator.schedule
        self.times = lcm_timesteps(generator.sampler_steps, g_schedule.num_steps, g_schedule.num_steps)
        fake.net.to(self.device).train()
        self.opt = torch.optim.AdamW(fake.net.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)
        self.teacher_calls = 0
        self.num_classes = 0

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _t(self, k: int, n: int) -> torch.Tensor:
        return torch.full((n,), self.times[k], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def next_batch(self) -> TrainingBatch:
        """G's input at its last step: noise for one step; for K > 1 the sample of its first K - 1
        steps (without gradient), re-noised (x0 clamped where the teacher clamps), as G's sampler
        makes it. Only the last step is trained, so the fake score learns G's final samples alone.
        With ``regression`` the batch has ``rows`` more from the bank, their endpoints in
        ``meta["regression"]``."""
        k = len(self.times) - 1
        x = self._inputs(self.batch)
        if not self.regression:
            return TrainingBatch(x_t=x, t=self._t(k, self.batch), target=None)
        bank_x, bank_y = self._bank()
        pick = torch.randint(len(bank_x), (self.rows,), generator=self.rng, device=self.device)
        return TrainingBatch(x_t=torch.cat([x, bank_x[pick]]), t=self._t(k, self.batch + self.rows), target=None,
                             meta={"regression": bank_y[pick]})

    def _inputs(self, n: int) -> torch.Tensor:
        """``n`` of G's inputs at its last step (``next_batch``'s)."""
        x = self._randn((n, *self.generator.sample_shape))
        schedule, c = self.generator.schedule, x.shape[1]
        for j in range(len(self.times) - 1):
            t = self._t(j, n)
            x0 = generator_x0(schedule, self.generator.net(x, t)[:, :c].float(), x, t)
            x0 = x0.clamp(-1, 1) if self.generator.clip_x0 else x0
            x = schedule.q_sample(x0, self._t(j + 1, n), self._randn(x0.shape))
        return x

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression pairs, drawn once (then kept in the state): ``REGRESSION_BANK`` inputs of G's
        last step as its sampler makes them from samples of the teacher's (DDIM, ``SAMPLE_STEPS``
        steps from T - 1), re-noised (pure noise for one step), each with the teacher's DDIM endpoint
        from it. (The DKDM student's own first K - 1 steps, in their place, gave endpoints of 3-4x the
        teacher's digits-FID, and a generator pulled to them 2.1-4.1x: docs/few-step.md.)"""
        if self.bank is None:
            xs, ys = [], []
            for i in range(0, REGRESSION_BANK, self.batch):
                xs.append(self._bank_inputs(min(self.batch, REGRESSION_BANK - i)))
                ys.append(self.ode_endpoint(xs[-1], self.times[-1]))
            self.bank = (torch.cat(xs), torch.cat(ys))
        return self.bank

    def _bank_inputs(self, n: int) -> torch.Tensor:
        z = self._randn((n, *self.generator.sample_shape))
        if len(self.times) == 1:
            return z
        x0 = self.ode_endpoint(z, self.teacher.schedule.num_steps - 1, SAMPLE_STEPS)
        return self.teacher.schedule.q_sample(x0, self._t(len(self.times) - 1, n), self._randn(x0.shape))

    @torch.no_grad()
    def ode_endpoint(self, x: torch.Tensor, top: int, steps: int = ODE_STEPS) -> torch.Tensor:
        """The teacher's deterministic (DDIM) endpoint from ``x`` at timestep ``top`` in ``steps`` evenly
        spaced steps: x0 at each (clamped where the teacher clamps) and the epsilon it implies, as
        ``consistency.teacher_ode_step``; the last x0 is the endpoint."""
        times = sorted({round(top * (1 - i / steps)) for i in range(steps)}, reverse=True)
        schedule = self.teacher.schedule
        for i, t in enumerate(times):
            tt = torch.full((len(x),), t, dtype=torch.long, device=self.device)
            x0 = self.x0(self.teacher, x, tt)
            if i + 1 < len(times):
                x = schedule.q_sample(x0, torch.full_like(tt, times[i + 1]), schedule.eps_from_x0(x, tt, x0))
        self.teacher_calls += len(x) * len(times)
        return x0

    def x0(self, model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``model``'s (the teacher's) denoised estimate at (x_t, t), clamped where the teacher clamps."""
        pred = model.output(x_t, t)[:, : x_t.shape[1]].float()
        x0 = model.schedule.eps_and_x0(pred, x_t, t, model.prediction)[1]
        return x0.clamp(-1, 1) if self.teacher.clip_x0 else x0

    def judge(self, x_g: torch.Tensor) -> torch.Tensor:
        """DMD's gradient for G's samples ``x_g``, and the fake score's step on the same noisy samples.

        x_g is noised to x_t at t ~ U[2% of T, t*]; the teacher's x0 (without gradient) and the fake
        score's, from one forward of its network, give the gradient; the same forward's denoising
        loss steps the fake score. DMD2 draws the fake score's x_t apart (a second forward, at t over
        all of T): sharing it trains the fake score where it is read and spares about a tenth of a
        step (docs/few-step.md)."""
        x_g = x_g.detach()
        for _ in range(self.fake_updates - 1):  # DMD2's two time-scale rule: the fake score steps first
            self._fake_step(*self._noised(x_g))
        x_t, t, noise = self._noised(x_g)
        self.teacher_calls += len(x_g)
        with torch.no_grad():
            real_x0 = self.x0(self.teacher, x_t, t)
        pred = self._fake_step(x_t, t, noise)
        fake_x0 = self.fake.schedule.eps_and_x0(pred, x_t, t, self.fake.prediction)[1]
        fake_x0 = fake_x0.clamp(-1, 1) if self.teacher.clip_x0 else fake_x0
        return matching_gradient(x_g, real_x0, fake_x0)

    def _noised(self, x_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G's samples noised at t ~ U[2% of T, t*]: (x_t, t, the noise)."""
        low, high = int(T_MIN * self.teacher.schedule.num_steps), self.generator.schedule.num_steps
        t = torch.randint(min(low, high - 1), high, (len(x_g),), generator=self.rng, device=self.device)
        noise = self._randn(x_g.shape)
        return self.teacher.schedule.q_sample(x_g, t, noise), t, noise

    def _fake_step(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One step of the fake score's denoising loss at (x_t, t); its epsilon before the step, detached."""
        pred = self.fake.net(x_t, t)[:, : x_t.shape[1]].float()
        loss = F.mse_loss(pred, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return pred.detach()

    def describe(self) -> dict:
        out = {"kind": "matching", "timesteps": self.times, "batch": self.batch}
        if self.fake_updates != 1:
            out["fake_updates"] = self.fake_updates
        if self.regression:
            out["regression"] = {"weight": self.regression, "bank": REGRESSION_BANK, "ode_steps": ODE_STEPS,
                                 "rows": self.rows}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        opt = self.opt.state_dict()["state"]
        moments = {f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items()}
        bank = {} if self.bank is None else {"bank.x": self.bank[0], "bank.y": self.bank[1]}
        return {**{f"fake.{k}": v for k, v in self.fake.net.state_dict().items()}, **moments, **bank,
                "rng": self.rng.get_state(), "teacher_calls": torch.tensor(self.teacher_calls)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fake.net.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("fake.")})
        saved = self.opt.state_dict()
        moments: dict[int, dict] = {}
        for key, v in state.items():
            if key.startswith("opt."):
                i, name = key[4:].split(".", 1)
                moments.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})
        self.rng.set_state(state["rng"].cpu())
        if "bank.x" in state:
            self.bank = (state["bank.x"].to(self.device), state["bank.y"].to(self.device))
        self.teacher_calls = int(state["teacher_calls"])
