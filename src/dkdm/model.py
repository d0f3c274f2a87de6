"""A diffusion model: a network plus the process it models, saved as a self-describing directory.

A model directory holds ``dkdm_model.json`` (architecture spec, data shape, output
parameterization, schedule) and ``model.safetensors`` (weights). Teachers and students are both
``DiffusionModel``s; the pool, the trainer and the samplers only use this class.
"""

from __future__ import annotations


import torch
from torch import nn

from .diffusion import PREDICTIONS, VARIANCES, Schedule, reverse_sample
from .errors import DkdmError
from .students import build_net, parse_spec, student_spec
from .students import num_classes as _num_classes

class DiffusionModel(nn.Module):
    """``net(x, t)`` with the schedule and output parameterization needed to read its output."""

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        sample_shape,
        prediction: str = "epsilon",
        variance: str = "learned_range",
        clip_x0: bool = False,
        spec: dict | None = None,
        extra: dict | None = None,
        num_classes: int | None = None,
        null_class: int | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise DkdmError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if variance not in VARIANCES:
            raise DkdmError(f"unknown variance type {variance!r}; choose one of {', '.join(VARIANCES)}")
        self.net = net
        self.schedule = schedule
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.prediction = prediction
        self.variance = variance
        self.clip_x0 = clip_x0
        self.spec = spec
        self.extra = dict(extra or {})
        self.num_classes = num_classes if num_classes is not None else _num_classes(spec)
        self.null_class = null_class  # label of the unconditional model, for classifier-free guidance
        self.decoder = decoder  # a latent model's autoencoder (shared with its teacher), or None

    @classmethod
    def build(cls, spec, sample_shape, schedule: Schedule, variance="learned_range", **kw):
        """A fresh model of architecture ``spec`` (learned variance doubles the output channels)."""
        spec = parse_spec(spec)
        channels = sample_shape[0]
        out = 2 * channels if variance == "learned_range" else channels
        net = build_net(spec, sample_shape, out)
        return cls(net, schedule, sample_shape, variance=variance, spec=spec, **kw)

    @classmethod
    def student_of(cls, teacher: "DiffusionModel", spec=None, variance="learned_range", **kw) -> "DiffusionModel":
        """A fresh student for ``teacher``: architecture ``spec`` (default: the teacher's family at about
        half its width, ``students.default_student_spec``) on the teacher's data shape, schedule,
        classes, x0 clipping and (latent models) autoencoder, predicting epsilon."""
        return cls.build(student_spec(teacher, spec), teacher.sample_shape, teacher.schedule, variance=variance,
                         prediction="epsilon", clip_x0=teacher.clip_x0, decoder=teacher.decoder, **kw)

    @classmethod
    def few_step_of(cls, model: "DiffusionModel", steps: int, prediction: str = "v_prediction",
                    grid: int | None = None, schedule: Schedule | None = None,
                    objective: str = "consistency") -> "DiffusionModel":
        """A consistency student that samples in ``steps`` steps, started from ``model``'s weights: the
        same architecture with the sample's channels only (a learned variance's outputs dropped),
        predicting ``prediction`` (v by default: its x0 stays well conditioned at the noisiest steps,
        where x0 from epsilon multiplies the network's error by 1 / sqrt(alpha_bar), 2e4 at T - 1 of
        a cosine schedule). ``schedule``: another than the model's (a matching generator's, cut at
        its first timestep: matching.py); ``objective``: how it is trained, recorded for its card."""
        from .consistency import GRID
        from .students import drop_variance_outputs

        if model.spec is None:
            raise DkdmError("a few-step student starts from a model dkdm can rebuild (a spec); this one was built "
                            "from a custom nn.Module")
        schedule = schedule or model.schedule
        T = schedule.num_steps
        grid = min(GRID, T) if grid is None else grid
        if not 1 <= grid <= T:
            raise DkdmError(f"--consistency-grid must be in 1..{T}, got {grid}")
        if not 1 <= steps <= grid:
            raise DkdmError(f"--sampler-steps must be in 1..{grid} (the --consistency-grid the K timesteps come from), "
                            f"got {steps}")
        extra = {**model.extra, "sampler": {"kind": "consistency", "steps": int(steps), "grid": grid,
                                            "objective": objective}}
        few = cls.build(model.spec, model.sample_shape, schedule, variance="fixed_small", prediction=prediction,
                        clip_x0=model.clip_x0, extra=extra, null_class=model.null_class, decoder=model.decoder)
        state = {k: v.detach().float().cpu() for k, v in model.net.state_dict().items()}
        few.net.load_state_dict(drop_variance_outputs(model.spec, state, few.net.state_dict()))
        return few

    def forward(self, x, t, y=None):
        dt = self.inference_dtype
        if dt is not None:
            x = x.to(dt)
        out = self.net(x, t) if y is None else self.net(x, t, y)
        return out if dt is None else out.float()

    inference_dtype = None

    @property
    def sampler_steps(self) -> int | None:
        """K for a few-step (consistency) student, which samples in K steps by default; else None."""
        sampler = self.extra.get("sampler")
        return int(sampler["steps"]) if sampler else None

    def check_sampling_steps(self, steps: int | None) -> None:
        """A one-line error for sampling steps this model cannot take."""
        if self.sampler_steps:
            from .consistency import GRID

            grid = int(self.extra["sampler"].get("grid", GRID))
            if steps is not None and not 1 <= steps <= grid:
                raise DkdmError(f"--steps must be in 1..{grid} for this few-step student (it samples in "
                                f"{self.sampler_steps} by default), got {steps}")
        elif steps is not None and not 2 <= steps <= self.schedule.num_steps:
            raise DkdmError(f"--steps must be in 2..{self.schedule.num_steps}, got {steps}")

    def set_inference_dtype(self, dtype: str) -> "DiffusionModel":
        """Run the network in bfloat16 / float16 (a teacher: faster forwards, slightly different
        targets); outputs come back as float32 so the diffusion math stays in full precision.
        The weights are cast in place: going back to float32 keeps their rounding."""
        dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise DkdmError(f"unknown teacher dtype {dtype!r}; choose one of {', '.join(dtypes)}")
        self.inference_dtype = dtypes[dtype]
        self.net.to(self.inference_dtype or torch.float32)
        return self

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images from samples: a latent model decodes them with its autoencoder."""
        if self.decoder is None:
            return x
        dev = next(self.decoder.parameters()).device
        return torch.cat([self.decoder.decode(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])

    def labels_for(self, n: int, generator=None, device="cpu", prior: torch.Tensor | None = None):
        """Class labels for n samples: uniform over the classes, or drawn from ``prior``."""
        if not self.num_classes:
            return None
        if prior is not None:
            return torch.multinomial(prior.to(device).double(), n, replacement=True, generator=generator)
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=device)

    def output(self, x, t, y=None, guidance: float = 1.0):
        """The network output; with ``guidance`` != 1, classifier-free guided towards ``y``.

        Guidance mixes the prediction channels only; a learned variance comes from the
        conditional output.
        """
        out = self(x, t, y)
        if guidance == 1.0 or y is None:
            return out
        if self.null_class is None:
            raise DkdmError("classifier-free guidance needs a model with an unconditional (null) label; this one has none")
        uncond = self(x, t, torch.full_like(y, self.null_class))
        c = x.shape[1]
        mixed = uncond[:, :c] + guidance * (out[:, :c] - uncond[:, :c])
        return torch.cat([mixed, out[:, c:]], dim=1)

    def respaced(self, num_steps: int) -> "DiffusionModel":
        """This model on an evenly respaced schedule of ``num_steps`` steps (shares the weights).

        Each of its steps jumps between kept steps of the original schedule; the network still
        sees the original timesteps. A teacher viewed this way feeds a student with fewer steps.
        """
        if num_steps == self.schedule.num_steps:
            return self
        try:
            sched, tmap = self.schedule.respace(num_steps)
        except ValueError as e:
            raise DkdmError(f"cannot respace {self.schedule.num_steps} steps to {num_steps}: {e}")
        view = DiffusionModel(_Respaced(self.net, tmap), sched, self.sample_shape, self.prediction, self.variance,
                              self.clip_x0, spec=self.spec, extra=self.extra, num_classes=self.num_classes,
                              null_class=self.null_class, decoder=self.decoder)
        view.inference_dtype = self.inference_dtype  # the shared weights keep their dtype, so must the inputs
        return view

    def reverse(self, x, t, schedule: Schedule | None = None, t_model=None, clip_x0=None, y=None,
                guidance: float = 1.0):
        """The model's reverse step at (x, t[, label y]); ``schedule``/``t_model`` for respaced sampling."""
        out = self.output(x, t if t_model is None else t_model, y, guidance)
        sched = schedule or self.schedule
        clip = self.clip_x0 if clip_x0 is None else clip_x0
        return sched.reverse(out.float(), x, t, self.prediction, self.variance, clip_x0=clip)

    @torch.no_grad()
    def sample(self, num: int, steps: int | None = None, generator=None, batch_size: int = 1024, progress=None,
               labels: torch.Tensor | None = None, guidance: float = 1.0, return_labels: bool = False):
        """Ancestral sampling with ``steps`` evenly respaced steps (default: all of them).

        A class-conditional model draws uniform labels unless ``labels`` are given; with
        ``return_labels`` the call returns ``(samples, labels)`` (labels None when unconditional),
        so whoever scores the samples gets the labels they were drawn for.
        """
        if self.sampler_steps:  # a few-step (consistency) student: its own K-step sampler
            from .consistency import sample as consistency_sample

            samples, labels = consistency_sample(self, num, steps or self.sampler_steps, generator, batch_size,
                                                 progress, labels, guidance)
            return (samples, labels) if return_labels else samples
        device = next(self.parameters(), torch.empty(0)).device
        if steps is None or steps == self.schedule.num_steps:
            sched, tmap = self.schedule, torch.arange(self.schedule.num_steps)
        else:
            sched, tmap = self.schedule.respace(steps)
        tmap = tmap.to(device)
        if labels is None:
            labels = self.labels_for(num, generator, device)
        chunks = []
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            y = None if labels is None else labels[start:start + n].to(device)
            x = torch.randn((n, *self.sample_shape), generator=generator, device=device)
            for i in reversed(range(sched.num_steps)):
                t = torch.full((n,), i, device=device, dtype=torch.long)
                step = self.reverse(x, t, schedule=sched, t_model=tmap[t], y=y, guidance=guidance)
                x = reverse_sample(step, t, torch.randn(x.shape, generator=generator, device=device))
                if progress is not None:
                    progress.update(n)
            chunks.append(x.cpu())
        samples = torch.cat(chunks)
        return (samples, None if labels is None else labels.cpu()) if return_labels else samples

    # persistence -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "format": "dkdm-model",
            "version": 1,
            "spec": self.spec,
            "sample_shape": list(self.sample_shape),
            "prediction": self.prediction,
            "variance": self.variance,
            "clip_x0": self.clip_x0,
            "schedule": self.schedule.config,
            "num_classes": self.num_classes,
            **({"null_class": self.null_class} if self.null_class is not None else {}),
            **self.extra,
        }

class _Respaced(nn.Module):
    """A network called with respaced indices, mapped back to the timesteps it was trained on."""

    def __init__(self, net: nn.Module, tmap: torch.Tensor):
        super().__init__()
        self.inner = net
        self.register_buffer("tmap", tmap, persistent=False)

    def forward(self, x, t, y=None):
        t = self.tmap.to(t.device)[t]
        return self.inner(x, t) if y is None else self.inner(x, t, y)


