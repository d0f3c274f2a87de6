"""--cuda-graphs replays the student update (and a pool's teacher step) as CUDA graphs: it must
train exactly as the plain loop does, and say in one line where it cannot run."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from dkdm.cli import main
from dkdm.data import DataSource, Toy2D
from dkdm.diffusion import Schedule
from dkdm.errors import DkdmError
from dkdm.model import DiffusionModel
from dkdm.pool import KnowledgePool
from dkdm.trainer import TrainConfig, Trainer

CUDA = torch.cuda.is_available()
SPEC = "unet:widths=16-32,layers=1,groups=8"


def _accelerator(**kwargs) -> Accelerator:
    """A new Accelerator whatever an earlier test set up (accelerate keeps one state per process)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)


class RandomImages:
    """An image set for data-based training: fixed random images in [-1, 1]."""

    name, num_classes, sample_shape = "random", 0, (3, 16, 16)

    def __init__(self):
        self.images = torch.randn(64, *self.sample_shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_without_cuda_is_a_one_line_error(tmp_path, capsys):
    sched = Schedule.named("linear", 10)
    model = DiffusionModel.build("mlp:width=8,depth=1", (2,), sched)
    with pytest.raises(DkdmError, match="needs a CUDA device"):
        Trainer(model, DataSource(Toy2D(), sched, 8), TrainConfig(steps=2, cuda_graphs=True), tmp_path / "api")
    code = main(["train", "--data", "toy2d", "--steps", "2", "--cuda-graphs", "--no-progress", "--out",
                 str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["dkdm train: error: --cuda-graphs needs a CUDA device, and this machine has none "
                                 "(drop the flag)"]
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize("objective", ["dkdm", "consistency"])
def test_the_graphed_update_needs_only_its_inputs(tmp_path, objective):
    """The captured update sees a batch only through its graph inputs (x_t, t, labels, the target's
    eps, x0, mean and log-variance): fed those alone, it trains exactly as the plain update (CPU), for
    DKDM and for a few-step consistency student (its ODE step reads the target's x0)."""
    def run(out, through_inputs):
        sched = Schedule.named("cosine", 20)
        torch.manual_seed(0)
        teacher = DiffusionModel.build(SPEC, (3, 8, 8), sched, clip_x0=True).eval().requires_grad_(False)
        pool = KnowledgePool(teacher, 4, "dynamic", rho=0.2, seed=0, preparation="sampled", prep_steps=3)
        pool.prepare()
        student = DiffusionModel.build(SPEC, (3, 8, 8), sched, variance="learned_range")
        if objective == "consistency":
            student = DiffusionModel.few_step_of(student, 2, grid=10)
        trainer = Trainer(student, pool, TrainConfig(steps=4, lr=1e-2, log_every=1, ckpt_every=10 ** 6,
                                                     objective=objective), out, progress=False,
                          accelerator=_accelerator(cpu=True))
        if through_inputs:
            trainer._step = lambda batch: trainer._graphed_update(*trainer._graph_inputs(batch))
        trainer.train()
        return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    plain = run(tmp_path / "plain", False)
    assert run(tmp_path / "inputs", True) == plain and len(set(plain)) == 4


def _flat(tensors):
    return torch.cat([v.detach().flatten().float().cpu() for v in tensors])


def _run(out, source_kind, graphs, mixed_precision, steps=10):
    """A short run on CUDA; returns the per-step losses and the student's weights (before, after, EMA)."""
    device = torch.device("cuda")
    sched = Schedule.named("cosine", 40)
    torch.manual_seed(0)
    teacher = DiffusionModel.build(SPEC, (3, 16, 16), sched, clip_x0=True).to(device).eval().requires_grad_(False)
    student = DiffusionModel.build(SPEC, (3, 16, 16), sched)
    objective = "consistency" if source_kind == "pool, consistency" else "dkdm"
    if objective == "consistency":  # a few-step student (dkdm fewstep) on the same pool
        student = DiffusionModel.few_step_of(student, 4, grid=20)
    if source_kind.startswith("pool"):
        source = KnowledgePool(teacher, 16, "dynamic", rho=0.1, seed=0, device=device, preparation="sampled",
                               prep_steps=4)
        source.prepare()
    else:
        source = DataSource(RandomImages(), sched, 16, seed=0, device=device)
    before = _flat(student.net.parameters())
    cfg = TrainConfig(steps=steps, lr=1e-2, warmup=2, grad_clip=1.0, ema_decay=0.9, log_every=1, ckpt_every=10 ** 6,
                      mixed_precision=mixed_precision, cuda_graphs=graphs, objective=objective)
    trainer = Trainer(student, source, cfg, out, progress=False,
                      accelerator=_accelerator(mixed_precision=mixed_precision))
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # same kernels in both runs
    trainer.check_every = 4  # the deferred finiteness record, inside the graph
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    captured = trainer._graph is not None and trainer._graph.graph is not None
    return losses, (before, _flat(trainer.net.parameters()), _flat(trainer.ema.shadow.values())), captured


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (bench/gpu.sh runs this test)")
@pytest.mark.parametrize("source_kind, mixed_precision", [("pool", "no"), ("data", "bf16"),
                                                          ("pool, consistency", "no")])
def test_cuda_graph_training_computes_the_plain_losses(tmp_path, source_kind, mixed_precision):
    plain, (before, w_plain, ema_plain), _ = _run(tmp_path / "plain", source_kind, False, mixed_precision)
    graphed, (_, w_graphed, ema_graphed), captured = _run(tmp_path / "graphed", source_kind, True, mixed_precision)
    assert captured  # the learning-rate warm-up ran plain, the later steps were replays
    # replays see each step's new batch and update the weights: a stale input, a skipped or
    # doubled optimizer step would move losses and weights by far more than the tolerances
    assert graphed == pytest.approx(plain, rel=1e-4)
    assert len(set(graphed)) == len(graphed)
    moved = (w_plain - before).abs().max()  # about steps x lr
    assert moved > 0.01
    assert (w_graphed - w_plain).abs().max() < 1e-3 * moved
    assert (ema_graphed - ema_plain).abs().max() < 1e-3 * moved
