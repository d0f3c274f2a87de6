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
score, a second copy of the DKDM student (or of the teacher, as in DMD and SiD: ``--fake-from``; its
loss in what its network predicts), follows G's distribution with the denoising loss on the
same x_t, one update per G update, from the one forward whose output (without gradient) gave x0_fake
(DMD2 draws the fake score's noisy samples apart, over all of T: a second forward; ``fake_updates``
> 1 steps it that many times per G update, the first ones on G's samples noised apart, as DMD2's
two time-scale rule does with five). Each G step costs
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


class MatchingSource:
    """G's inputs (the trainer's batches) and the two scores that judge its outputs.

    ``generator`` is the run's student (its plain network runs the backward simulation without
    gradient); ``fake`` is the fake score, stepped here with its own optimizer on each batch of G's
    samples (``judge``). Its weights, moments, random generator (seeded per process: ``seed``) and the
    teacher-forward count are this source's state, kept per process like a pool shard (each
    process draws its own samples, and its fake score follows them)."""

    def __init__(self, generator, teacher, fake, batch: int, lr: float, device=None, seed: int = 0,
                 fake_updates: int = 1):
        self.generator, self.teacher, self.fake = generator, teacher, fake
        self.fake_updates = int(fake_updates)
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
        makes it. Only the last step is trained, so the fake score learns G's final samples alone."""
        shape = (self.batch, *self.generator.sample_shape)
        x = self._randn(shape)
        k = len(self.times) - 1
        schedule, c = self.generator.schedule, shape[1]
        for j in range(k):
            t = self._t(j, self.batch)
            x0 = generator_x0(schedule, self.generator.net(x, t)[:, :c].float(), x, t)
            x0 = x0.clamp(-1, 1) if self.generator.clip_x0 else x0
            x = schedule.q_sample(x0, self._t(j + 1, self.batch), self._randn(x0.shape))
        return TrainingBatch(x_t=x, t=self._t(k, self.batch), target=None)

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
            self._fake_step(*self._noised(x_g), x_g)
        x_t, t, noise = self._noised(x_g)
        self.teacher_calls += len(x_g)
        with torch.no_grad():
            real_x0 = self.x0(self.teacher, x_t, t)
        pred = self._fake_step(x_t, t, noise, x_g)
        fake_x0 = self.fake.schedule.eps_and_x0(pred, x_t, t, self.fake.prediction)[1]
        fake_x0 = fake_x0.clamp(-1, 1) if self.teacher.clip_x0 else fake_x0
        return matching_gradient(x_g, real_x0, fake_x0)

    def _noised(self, x_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G's samples noised at t ~ U[2% of T, t*]: (x_t, t, the noise)."""
        low, high = int(T_MIN * self.teacher.schedule.num_steps), self.generator.schedule.num_steps
        t = torch.randint(min(low, high - 1), high, (len(x_g),), generator=self.rng, device=self.device)
        noise = self._randn(x_g.shape)
        return self.teacher.schedule.q_sample(x_g, t, noise), t, noise

    def _fake_step(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """One step of the fake score's denoising loss at (x_t, t) of the sample ``x0``, in what its network
        predicts (epsilon, v or x0: a copy of the teacher predicts what the teacher does); its prediction
        before the step, detached."""
        pred = self.fake.net(x_t, t)[:, : x_t.shape[1]].float()
        loss = F.mse_loss(pred, self.fake.schedule.target(self.fake.prediction, x0, t, noise))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return pred.detach()

    def describe(self) -> dict:
        out = {"kind": "matching", "timesteps": self.times, "batch": self.batch}
        return out if self.fake_updates == 1 else {**out, "fake_updates": self.fake_updates}

    def state_dict(self) -> dict[str, torch.Tensor]:
        opt = self.opt.state_dict()["state"]
        moments = {f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items()}
        return {**{f"fake.{k}": v for k, v in self.fake.net.state_dict().items()}, **moments,
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
        self.teacher_calls = int(state["teacher_calls"])
