"""Knowledge extraction: the teacher's own reverse process as the data source (the
paper's dynamic iterative distillation, arXiv 2409.03550).

Pool entries are (x, s) with s the 1-based step of the papers: x is x_s, s = T_steps is pure
noise, s = 0 a finished sample. The teacher's step from x_s is conditioned on model index s - 1.

``KnowledgePool`` (``next_batch``, ``state_dict``, ``load_state_dict``) holds the entries; what
differs between the kinds is one class each (``PoolKind``: size, where entries start, which are
drawn), registered in ``KINDS``:
- ``iterative``: B trajectories in lock-step, every batch at one t;
- ``shuffled``: B entries at independent t, all advanced each iteration;
- ``dynamic``: round(rho*T)*B entries, B drawn at random each iteration (the paper's method).
Each training sample costs exactly one teacher forward.
"""

from __future__ import annotations

import math

import torch

from .diffusion import TrainingBatch, reverse_sample
from .choices import POOL_KINDS
from .errors import DkdmError
from .preparation import _bands, _without_autotuning, preparation_batch, resolve_preparation
from .settings import checked_batch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PoolKind:
    """What a pool kind decides: how many entries it holds, where they start (nothing to prepare
    where all start at noise; else at stops spread uniformly over 1..T-1, prepared by the pool's
    preparation), which a batch draws. By default: B entries, every one drawn each batch.
    A new kind is a subclass here, registered in ``KINDS``, its name in ``choices.POOL_KINDS``."""

    name = ""
    starts_at_noise = False  # True: every entry starts at T (nothing to prepare)

    def size(self, rho: float, num_steps: int, batch_size: int) -> int:
        return batch_size

    def draw(self, pool: "KnowledgePool") -> torch.Tensor:
        return torch.arange(pool.size, device=pool.device)


class Shuffled(PoolKind):
    """B entries at independent t, all advanced each iteration."""

    name = "shuffled"


class Iterative(PoolKind):
    """B trajectories in lock-step from noise, every batch at one t: no preparation."""

    name = "iterative"
    starts_at_noise = True


class Dynamic(PoolKind):
    """The paper's dynamic iterative distillation: round(rho*T)*B entries, B drawn at random each step."""

    name = "dynamic"

    def size(self, rho: float, num_steps: int, batch_size: int) -> int:
        if not rho > 0:
            raise DkdmError(f"--rho must be > 0, got {rho}")
        blocks = round(rho * num_steps)
        if blocks < 1:
            raise DkdmError(
                f"--rho {rho} with {num_steps} diffusion steps gives a pool of round(rho*T)={blocks} "
                f"batches, smaller than one batch of {batch_size}; use --rho >= {0.5 / num_steps:g}"
            )
        return blocks * batch_size

    def draw(self, pool: "KnowledgePool") -> torch.Tensor:
        return torch.randperm(pool.size, generator=pool.generator, device=pool.device)[: pool.batch_size]


#: Every pool kind by name (the command line's choices are choices.POOL_KINDS, the same names).
KINDS = {kind.name: kind() for kind in (Iterative, Shuffled, Dynamic)}


def pool_kind(name: str) -> PoolKind:
    if name not in KINDS:
        raise DkdmError(f"unknown pool kind {name!r}; choose one of {', '.join(POOL_KINDS)}")
    return KINDS[name]


def pool_size(kind: str, rho: float, num_steps: int, batch_size: int) -> int:
    """Number of pool entries, validated; DkdmError for impossible settings."""
    kind = pool_kind(kind)
    checked_batch(batch_size)
    return kind.size(rho, num_steps, batch_size)


def pool_memory_bytes(size: int, sample_shape, dtype: str) -> int:
    return size * math.prod(sample_shape) * DTYPES[dtype].itemsize + size * 8


def preparation_cost(kind: str, size: int, num_steps: int, method: str = "exact", prep_steps: int = 25) -> int:
    """Teacher sample-steps to prepare the pool: N * T/2 (exact, expected), N * K (sampled), or for
    shared about N * K / (K - 1): K steps for each of the ~N / (K - 1) samples a band of stops needs,
    plus the spread of the bands' counts (an estimate for CPU chunks; larger chunks spread less)."""
    if pool_kind(kind).starts_at_noise:
        return 0
    method = resolve_preparation(method, num_steps, prep_steps)
    if method == "sampled":
        return size * prep_steps
    if method == "shared":
        bands = _bands(num_steps, prep_steps)
        per_band = min(size, 1024 * bands) / bands
        return math.ceil(size * prep_steps / bands * (1 + math.sqrt(2 * math.log(max(bands, 2)) / per_band)))
    return size * num_steps // 2


class KnowledgePool:
    """A pool of partially denoised teacher samples that yields student training batches."""

    def __init__(self, teacher, batch_size: int, kind: str = "dynamic", rho: float = 0.4,
                 dtype: str = "float32", seed: int = 0, device="cpu", preparation: str = "auto",
                 prep_steps: int = 25, class_prior: torch.Tensor | None = None, guidance: float = 1.0):
        if dtype not in DTYPES:
            raise DkdmError(f"unknown pool dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        preparation = resolve_preparation(preparation, teacher.schedule.num_steps, prep_steps)
        if preparation == "sampled" and not 2 <= prep_steps <= teacher.schedule.num_steps:
            raise DkdmError(f"--prep-steps must be in 2..{teacher.schedule.num_steps}, got {prep_steps}")
        self.preparation = preparation
        self.prep_steps = prep_steps
        self.num_classes = teacher.num_classes
        if class_prior is not None:
            class_prior = torch.as_tensor(class_prior, dtype=torch.float64)
            if not self.num_classes or class_prior.shape != (self.num_classes,) or (class_prior < 0).any() \
                    or not class_prior.sum() > 0:
                raise DkdmError(f"class_prior must be {self.num_classes or 'no'} non-negative weights, one per class "
                                f"of the teacher")
        if guidance != 1.0 and (not self.num_classes or teacher.null_class is None):
            raise DkdmError("guidance needs a class-conditional teacher with an unconditional (null) label")
        self.class_prior = class_prior
        self.guidance = guidance
        self.teacher = teacher
        self.kind = kind
        self.pool_kind = pool_kind(kind)
        self.rho = rho
        self.batch_size = batch_size
        self.num_steps = teacher.schedule.num_steps
        self.size = pool_size(kind, rho, self.num_steps, batch_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.x = torch.zeros((self.size, *teacher.sample_shape), dtype=DTYPES[dtype], device=self.device)
        self.s = torch.zeros(self.size, dtype=torch.long, device=self.device)
        self.y = torch.zeros(self.size, dtype=torch.long, device=self.device) if self.num_classes else None
        self.teacher_calls = 0  # teacher sample-forwards spent on training batches
        self.prep_calls = 0  # teacher sample-forwards spent preparing the pool
        self.prepared = False
        self._graphed = None

    @property
    def schedule(self):
        """The schedule whose indices the batches' t are (the teacher's)."""
        return self.teacher.schedule

    def _noise(self, shape):
        return torch.randn(shape, generator=self.generator, device=self.device)

    def _labels(self, n):
        return self.teacher.labels_for(n, self.generator, self.device, self.class_prior)

    def _teacher_step(self, x, s, y=None):
        """One teacher reverse step from (x_s, s): returns x_{s-1} and the step's distribution."""
        x_prev, _, step = self._advance(x, s, y, self._noise(x.shape))
        return x_prev, step

    def _advance(self, x, s, y, noise):
        """x_{s-1}, the model index t = s - 1 and the teacher's step distribution at (x_s, s), the
        sample drawn with ``noise``. A pure function of its tensors (the unit a CUDA graph captures).

        The teacher runs under inference_mode (no autograd bookkeeping at all); its outputs are
        read, never written, by the student's loss, which inference tensors allow.
        """
        t = s - 1
        with torch.inference_mode():
            step = self.teacher.reverse(x, t, y=y, guidance=self.guidance)
            return reverse_sample(step, t, noise), t, step

    def use_cuda_graphs(self) -> None:
        """Replay the training batches' teacher step as a CUDA graph (the Trainer's --cuda-graphs).

        The draw, the restarts and the noise stay outside it, so the random streams and the
        batches are those of the plain pool."""
        from .cudagraphs import GraphedStep

        self._graphed = GraphedStep(self._advance)

    @torch.no_grad()
    def prepare(self, chunk: int | None = None, progress=None, resume: dict | None = None, on_chunk=None) -> None:
        """Bring every entry from noise to its own stop step, uniform over 1..T-1.

        ``chunk`` is the teacher's batch (default: ``preparation_batch``'s for this device). The
        entries are prepared chunk by chunk, each from the pool's one random stream, so the state
        after a chunk (``preparation_state``, handed to ``on_chunk``) is all a resumed preparation
        needs: ``prepare(resume=state)`` finishes the same pool, bit for bit, as if never stopped.
        """
        chunk = preparation_batch(chunk, self.device)
        T = self.num_steps
        if resume is not None:
            self._load_preparation(resume)
        else:
            self.x.copy_(self._noise(self.x.shape))
            if self.y is not None:
                self.y.copy_(self._labels(self.size))
            if self.pool_kind.starts_at_noise:
                self.s.fill_(T)
                self.prepared = True
                return
            self.s.copy_(torch.randint(1, T, (self.size,), generator=self.generator, device=self.device))
            self._prep_done = 0
        if progress is not None and self.prep_calls:
            progress.update(self.prep_calls)
        entries = chunk * _bands(T, self.prep_steps) if self.preparation == "shared" else chunk
        for start in range(self._prep_done, self.size, entries):
            end = min(start + entries, self.size)
            if self.preparation == "sampled":
                self._prepare_sampled(start, end, progress)
            elif self.preparation == "shared":
                self._prepare_shared(start, end, progress)
            else:
                self._prepare_exact(start, end, progress)
            self._prep_done = end
            if on_chunk is not None and end < self.size:
                on_chunk(self.preparation_state())
        self._check_finite()
        self.prepared = True

    def _prepare_exact(self, start: int, end: int, progress) -> None:
        """The paper's preparation: each entry runs the teacher's own chain from noise to its stop."""
        x = self.x[start:end].float()
        stop = self.s[start:end]
        y = None if self.y is None else self.y[start:end]
        with _without_autotuning():
            for s in range(self.num_steps, 1, -1):
                active = (stop < s).nonzero().squeeze(1)
                if len(active) == 0:
                    break
                sv = torch.full((len(active),), s, device=self.device)
                x[active], _ = self._teacher_step(x[active], sv, None if y is None else y[active])
                self.prep_calls += len(active)
                if progress is not None:
                    progress.update(len(active))
        self.x[start:end] = x.to(self.x.dtype)

    def _prepare_sampled(self, start: int, end: int, progress) -> None:
        """Cheap preparation: x0 from a K-step respaced teacher sampler, noised to each stop by q.

        x_s then follows q(x_s | x0) with x0 from the teacher's (few-step) distribution instead of
        the teacher's own marginal at s; it costs N*K teacher steps instead of N*T/2.
        """
        n = end - start
        labels = None if self.y is None else self.y[start:end]
        x0 = self.teacher.sample(n, self.prep_steps, self.generator, batch_size=n, progress=progress, labels=labels,
                                 guidance=self.guidance).to(self.device)
        self.prep_calls += n * self.prep_steps
        t = self.s[start:end] - 1
        self.x[start:end] = self.teacher.schedule.q_sample(x0, t, self._noise(x0.shape)).to(self.x.dtype)

    def _prepare_shared(self, start: int, end: int, progress) -> None:
        """Sampled preparation at about one teacher step per entry: each K-step x0 serves K - 1 entries.

        The stops are split into the K - 1 bands between the K-step sampler's times; each x0 is
        noised by q to one entry of every band, so a band holds as many distinct x0 as entries (as
        with sampled preparation, where every entry has its own) and M x0 (the most entries any
        band holds) cost M * K steps: about N * K / (K - 1) for N entries instead of N * K.
        (Noising the chain's own intermediate states forward instead gave students 9-16% worse on
        digits, docs/defaults.md.) A class-conditional entry takes its x0's label.
        """
        tmap = self.schedule.respace(self.prep_steps)[1].to(self.device)
        t = self.s[start:end] - 1
        band = (torch.searchsorted(tmap, t, right=True) - 1).clamp_(max=len(tmap) - 2)
        order = torch.sort(band, stable=True).indices
        counts = torch.bincount(band, minlength=len(tmap) - 1)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(band)
        rank[order] = torch.arange(len(t), device=self.device) - first[band[order]]
        n = int(counts.max())
        labels = None if self.y is None else self._labels(n)
        x0 = self.teacher.sample(n, self.prep_steps, self.generator, batch_size=n, progress=progress, labels=labels,
                                 guidance=self.guidance).to(self.device)
        self.prep_calls += n * self.prep_steps
        self.x[start:end] = self.schedule.q_sample(x0[rank], t, self._noise((len(t), *x0.shape[1:]))).to(self.x.dtype)
        if labels is not None:
            self.y[start:end] = labels[rank].to(self.y.dtype)

    def preparation_state(self) -> dict[str, torch.Tensor]:
        """What a preparation stopped after a chunk resumes from (see ``prepare``)."""
        return {**self.state_dict(), "prep_done": torch.tensor(self._prep_done)}

    def _load_preparation(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)
        self.prepared = False
        self._prep_done = int(state["prep_done"])

    def _check_finite(self) -> None:
        bad = ~torch.isfinite(self.x.flatten(1)).all(1)
        if bool(bad.any()):
            raise DkdmError(
                f"the teacher produced NaN/inf while preparing the pool ({int(bad.sum())} of {self.size} entries, "
                f"stopped at t={(self.s[bad][:4] - 1).tolist()}): the teacher is broken, or too imprecise "
                f"(try --teacher-dtype float32)"
            )

    @torch.no_grad()
    def next_batch(self) -> TrainingBatch:
        if not self.prepared:
            raise RuntimeError("prepare() the pool (or load its state) before drawing batches")
        idx = self.pool_kind.draw(self)
        s = self.s[idx]
        x = self.x[idx].float()
        y = None if self.y is None else self.y[idx]
        # entries that reached t=0 restart from noise at T; branch-free (a fresh draw for the whole
        # batch, kept where needed) so that the loop never waits on the device to count them
        done = s == 0
        x = torch.where(done.view(-1, *[1] * (x.dim() - 1)), self._noise(x.shape), x)
        s = s.masked_fill(done, self.num_steps)
        if y is not None:  # a restarted entry is a new sample: it gets a new label
            y = torch.where(done, self._labels(len(idx)), y)
            self.y[idx] = y
        advance = self._advance if self._graphed is None else self._graphed
        x_prev, t, step = advance(x, s, y, self._noise(x.shape))
        self.x[idx] = x_prev.to(self.x.dtype)
        self.s[idx] = t
        self.teacher_calls += len(idx)
        return TrainingBatch(x_t=x, t=t, target=step, y=y)

    def held_out(self, num: int, seed: int, chunk: int | None = None, progress=None) -> TrainingBatch:
        """``num`` states prepared as this pool's entries are, but from their own noise, with the
        teacher's targets: a fixed set a student is scored on and never trains on.

        Built by a small spread-out pool of the same teacher, preparation and guidance; it costs
        ``preparation_cost("shuffled", num, ...)`` + ``num`` teacher sample-steps.
        """
        sibling = KnowledgePool(self.teacher, num, "shuffled", seed=seed, device=self.device,
                                preparation=self.preparation, prep_steps=self.prep_steps,
                                class_prior=self.class_prior, guidance=self.guidance)
        sibling.prepare(chunk=chunk, progress=progress)
        return sibling.next_batch()

    # state --------------------------------------------------------------------------------
    def describe(self) -> dict:
        d = {"source": "pool", "pool": self.kind, "rho": self.rho, "batch": self.batch_size,
             "size": self.size, "dtype": self.dtype, "preparation": self.preparation}
        if self.preparation in ("sampled", "shared"):
            d["prep_steps"] = self.prep_steps
        if self.num_classes:
            d["classes"] = self.num_classes
            d["guidance"] = self.guidance
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "x": self.x, "s": self.s, "rng": self.generator.get_state(),
            "teacher_calls": torch.tensor(self.teacher_calls),
            "prep_calls": torch.tensor(self.prep_calls),
            **({"y": self.y} if self.y is not None else {}),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["x"].shape) != tuple(self.x.shape) or state["x"].dtype != self.x.dtype:
            raise DkdmError(
                f"saved pool holds {list(state['x'].shape)} {state['x'].dtype}, this run needs "
                f"{list(self.x.shape)} {self.x.dtype}: pool kind, --rho, --batch and --pool-dtype must match the saved run"
            )
        self.x.copy_(state["x"])
        self.s.copy_(state["s"])
        if self.y is not None:
            if "y" not in state:
                raise DkdmError("the saved pool has no class labels but this teacher is class-conditional")
            self.y.copy_(state["y"])
        self.generator.set_state(state["rng"])
        self.teacher_calls = int(state["teacher_calls"])
        self.prep_calls = int(state["prep_calls"])
        self.prepared = True
