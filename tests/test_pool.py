"""Knowledge pools: preparation spread, draws, restarts, teacher cost, state round trip."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dkdm.errors import DkdmError
from dkdm.pool import KnowledgePool, pool_memory_bytes, pool_size, preparation_cost
from dkdm.preparation import resolve_preparation
from helpers import CountingNet, tiny_teacher


def test_prepared_pool_is_uniform_over_1_to_T_minus_1():
    T = 20
    teacher = tiny_teacher(T)
    teacher.net = CountingNet(teacher.net)
    pool = KnowledgePool(teacher, batch_size=64, kind="dynamic", rho=5.0, seed=3)
    assert pool.size == 100 * 64
    pool.prepare(chunk=1000)
    s = pool.s
    assert s.min() >= 1 and s.max() <= T - 1
    counts = torch.bincount(s, minlength=T)[1:T].double()
    expected = pool.size / (T - 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = T - 2
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), chi2 / 2)
    assert p_value > 1e-3, f"chi-square {chi2:.1f} on {dof} dof, p={p_value:.2e}"
    # each entry cost exactly T - stop teacher steps, and training has cost nothing yet
    assert pool.prep_calls == int((T - s).sum()) == teacher.net.samples
    assert pool.teacher_calls == 0


class PointMassEps(torch.nn.Module):
    """The exact epsilon of data that is a point mass at 0: eps = x_t / sqrt(1 - abar_t)."""

    def __init__(self, schedule):
        super().__init__()
        self.s = schedule.sqrt_one_minus_alphas_cumprod.float()

    def forward(self, x, t):
        return x / self.s[t][:, None]


@pytest.mark.parametrize("preparation", ["exact", "sampled", "shared"])
def test_prepared_entries_follow_the_teachers_marginal_at_their_step(preparation):
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel

    T = 20
    sched = Schedule.named("linear", T)
    teacher = DiffusionModel(PointMassEps(sched), sched, (2,), variance="fixed_small")
    pool = KnowledgePool(teacher, batch_size=100, kind="dynamic", rho=3.0, seed=0, preparation=preparation,
                         prep_steps=4)
    pool.prepare()
    # x_s ~ N(0, 1 - abar_s) exactly when the reverse steps are right (abar_s at model index s-1)
    for s in range(1, T):
        x = pool.x[pool.s == s]
        want = 1 - sched.alphas_cumprod[s - 1].item()
        got = x.double().pow(2).mean().item()
        assert got == pytest.approx(want, rel=0.25), (s, got, want)


class AutotuneWatch(torch.nn.Module):
    """Records, per call, the batch size and whether cuDNN's autotuner was on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, *args, **kwargs):
        self.calls.append((len(x), torch.backends.cudnn.benchmark))
        return self.net(x, t, *args, **kwargs)


def test_exact_preparation_runs_without_the_autotuner_and_restores_it(monkeypatch):
    # the shrinking batches of exact preparation would make cuDNN search its algorithms again at
    # nearly every step; the training steps after it keep the autotuner that make_accelerator set
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    teacher = tiny_teacher(20)
    teacher.net = AutotuneWatch(teacher.net)
    pool = KnowledgePool(teacher, batch_size=16, kind="dynamic", rho=1.0, seed=0, preparation="exact")
    pool.prepare(chunk=pool.size)
    sizes = {n for n, _ in teacher.net.calls}
    assert len(sizes) > 5, "the test needs preparation batches of many sizes"
    assert not any(on for _, on in teacher.net.calls)
    assert torch.backends.cudnn.benchmark is True
    pool.next_batch()
    assert teacher.net.calls[-1] == (16, True)


def test_sampled_preparation_costs_k_teacher_steps_per_entry():
    T, K = 50, 5
    teacher = tiny_teacher(T)
    teacher.net = CountingNet(teacher.net)
    pool = KnowledgePool(teacher, batch_size=32, kind="dynamic", rho=0.2, seed=0, preparation="sampled", prep_steps=K)
    pool.prepare(chunk=100)
    assert pool.prep_calls == pool.size * K == teacher.net.samples
    assert pool.s.min() >= 1 and pool.s.max() <= T - 1 and pool.prepared
    assert preparation_cost("dynamic", pool.size, T, "sampled", K) == pool.prep_calls
    assert preparation_cost("dynamic", pool.size, T) == pool.size * T // 2


class ClassPointEps(torch.nn.Module):
    """The exact epsilon of data that is a point mass at its label y (a number): (x_t - sqrt(abar) y) / sqrt(1 - abar)."""

    def __init__(self, schedule):
        super().__init__()
        self.a = schedule.sqrt_alphas_cumprod.float()
        self.s = schedule.sqrt_one_minus_alphas_cumprod.float()

    def forward(self, x, t, y):
        return (x - self.a[t][:, None] * y[:, None].float()) / self.s[t][:, None]


@pytest.mark.parametrize("T,K", [(50, 5), (1000, 10)])
def test_shared_preparation_costs_about_one_teacher_step_per_entry(T, K):
    teacher = tiny_teacher(T)
    teacher.net = CountingNet(teacher.net)
    pool = KnowledgePool(teacher, batch_size=64, kind="dynamic", rho=0.2, seed=0, preparation="shared", prep_steps=K)
    pool.prepare(chunk=100)
    assert pool.prep_calls == teacher.net.samples
    # K steps per x0, an x0 per entry of the fullest of the K - 1 bands: N * K / (K - 1) plus the spread
    assert pool.size * K / (K - 1) <= pool.prep_calls <= 1.2 * pool.size * K / (K - 1) < pool.size * K
    assert pool.prep_calls <= preparation_cost("dynamic", pool.size, T, "shared", K) * 1.1
    assert pool.s.min() >= 1 and pool.s.max() <= T - 1 and pool.prepared


def test_shared_preparation_gives_each_entry_its_samples_label_and_state():
    # data: a point mass at the label (0, 1 or 2); an entry near t = 0 must sit at its own label,
    # and the labels stay uniform over the classes
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel

    T = 100
    sched = Schedule.named("linear", T)
    teacher = DiffusionModel(ClassPointEps(sched), sched, (1,), variance="fixed_small", num_classes=3)
    pool = KnowledgePool(teacher, batch_size=100, kind="dynamic", rho=1.0, seed=0, preparation="shared", prep_steps=10)
    pool.prepare(chunk=200)
    t = pool.s - 1
    low = t < 20
    abar = sched.alphas_cumprod[t[low]].float()
    resid = (pool.x[low, 0] - abar.sqrt() * pool.y[low].float()) / (1 - abar).sqrt()
    assert resid.mean().abs() < 0.1 and resid.std() == pytest.approx(1, rel=0.1)
    # about 9 entries share an x0 and its label: the fractions' spread is 3x a free draw's (0.014)
    counts = torch.bincount(pool.y, minlength=3).double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.06


@pytest.mark.parametrize("T,K,chosen", [(50, 5, "sampled"), (50, 25, "exact"), (50, 30, "exact"), (1000, 25, "sampled")])
def test_auto_preparation_is_sampled_for_few_steps_else_exact(T, K, chosen):
    teacher = tiny_teacher(T)
    pool = KnowledgePool(teacher, batch_size=8, kind="dynamic", rho=0.2, seed=0, prep_steps=K)  # default: auto
    assert pool.preparation == chosen == pool.describe()["preparation"]
    auto = preparation_cost("dynamic", pool.size, T, "auto", K)
    assert auto == preparation_cost("dynamic", pool.size, T, chosen, K)
    if T <= 50:
        teacher.net = CountingNet(teacher.net)
        pool.prepare()
        assert pool.prep_calls == teacher.net.samples
        assert abs(pool.prep_calls - auto) < 0.25 * auto


@pytest.mark.parametrize("train_forwards,chosen", [(10 ** 6, "sampled"), (5_000, "shared")])
def test_auto_shares_samples_only_where_sampled_preparation_would_cost_more_than_training(train_forwards, chosen):
    # 1,280 entries x K = 10: 12,800 teacher steps against the training's teacher forwards
    assert resolve_preparation("auto", 1000, 10, 1280, train_forwards) == chosen
    assert resolve_preparation("auto", 1000, 600, 1280, 5_000) == "exact"
    assert resolve_preparation("sampled", 1000, 10, 1280, 5_000) == "sampled"


def test_bad_preparation_settings_are_refused():
    with pytest.raises(DkdmError, match="preparation"):
        KnowledgePool(tiny_teacher(), 8, preparation="fast")
    with pytest.raises(DkdmError, match="--prep-steps"):
        KnowledgePool(tiny_teacher(20), 8, preparation="sampled", prep_steps=21)


def test_dynamic_draws_distinct_entries_and_writes_back():
    pool = KnowledgePool(tiny_teacher(), batch_size=16, kind="dynamic", rho=1.0, seed=1)
    pool.prepare()
    for _ in range(20):
        idx = pool.pool_kind.draw(pool)
        assert len(idx) == 16 and len(set(idx.tolist())) == 16
    before = pool.s.clone()
    batch = pool.next_batch()
    changed = (pool.s != before).nonzero().flatten()
    assert len(changed) <= 16 and len(batch.t) == 16
    assert torch.equal(pool.s[changed], before[changed] - 1)


def test_finished_entries_restart_from_noise_at_T():
    T = 20
    pool = KnowledgePool(tiny_teacher(T), batch_size=8, kind="dynamic", rho=0.5, seed=2)
    pool.prepare()
    pool.s.zero_()
    pool.x.fill_(1e6)  # finished samples: must not be fed to the teacher again
    batch = pool.next_batch()
    assert torch.equal(batch.t, torch.full((8,), T - 1))
    assert batch.x_t.abs().max() < 10
    drawn = (pool.s == T - 1).nonzero().flatten()
    assert len(drawn) == 8


def test_only_finished_entries_restart_the_others_keep_their_state():
    T = 20
    pool = KnowledgePool(tiny_teacher(T), batch_size=8, kind="shuffled", seed=2)  # draws every entry
    pool.prepare()
    pool.s[:4], pool.x[:4] = 0, 1e6
    pool.s[4:], pool.x[4:] = 5, 0.5
    batch = pool.next_batch()
    assert torch.equal(batch.t, torch.tensor([T - 1] * 4 + [4] * 4))
    assert batch.x_t[:4].abs().max() < 10 and batch.x_t[:4].std() > 0.3  # fresh noise
    assert torch.equal(batch.x_t[4:], torch.full((4, 2), 0.5))
    assert torch.equal(pool.s, batch.t)  # every entry moved one step on


def test_teacher_calls_equal_samples_trained_on():
    from dkdm.trainer import TrainConfig, Trainer

    teacher = tiny_teacher()
    counter = CountingNet(teacher.net)
    teacher.net = counter
    pool = KnowledgePool(teacher, batch_size=32, kind="dynamic", rho=1.0, seed=0)
    pool.prepare()
    prep = counter.samples
    student = tiny_teacher(seed=1, spec="mlp:width=16,depth=1").train()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Trainer(student, pool, TrainConfig(steps=7, ckpt_every=100, lr=1e-3), d, progress=False).train()
    assert counter.samples - prep == 7 * 32 == pool.teacher_calls


def test_iterative_pool_moves_in_lock_step_and_restarts():
    T = 6
    pool = KnowledgePool(tiny_teacher(T), batch_size=5, kind="iterative")
    pool.prepare()
    seen = [pool.next_batch().t.unique().tolist() for _ in range(T + 2)]
    assert seen == [[5], [4], [3], [2], [1], [0], [5], [4]]


def test_shuffled_pool_advances_every_entry():
    pool = KnowledgePool(tiny_teacher(10), batch_size=12, kind="shuffled", seed=0)
    pool.prepare()
    before = pool.s.clone()
    pool.next_batch()
    assert torch.equal(pool.s, torch.where(before == 0, torch.full_like(before, 10), before) - 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_state_round_trip_through_safetensors(tmp_path, dtype):
    pool = KnowledgePool(tiny_teacher(), batch_size=8, kind="dynamic", rho=1.0, dtype=dtype, seed=5)
    pool.prepare()
    pool.next_batch()
    save_file(pool.state_dict(), str(tmp_path / "pool.safetensors"))
    other = KnowledgePool(tiny_teacher(), batch_size=8, kind="dynamic", rho=1.0, dtype=dtype, seed=99)
    other.load_state_dict(load_file(str(tmp_path / "pool.safetensors")))
    a, b = pool.next_batch(), other.next_batch()
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t) and torch.equal(pool.x, other.x)
    assert pool.x.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert pool_memory_bytes(pool.size, (2,), dtype) == pool.x.numel() * pool.x.element_size() + pool.s.numel() * 8


def test_bad_pool_settings_are_refused():
    with pytest.raises(DkdmError, match="rho"):
        pool_size("dynamic", 0.0, 100, 8)
    with pytest.raises(DkdmError, match="smaller than one batch"):
        pool_size("dynamic", 0.001, 100, 8)
    with pytest.raises(DkdmError, match="pool kind"):
        pool_size("bogus", 0.4, 100, 8)
    assert pool_size("dynamic", 0.4, 1000, 128) == 400 * 128


def test_reduced_precision_teacher_changes_targets_by_a_bounded_amount():
    """bfloat16 teacher forwards (opt-in): targets stay within a few percent of float32."""
    from dkdm.formats import load_model

    teacher = load_model("builtin:digits")
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    t = torch.randint(0, 1000, (64,))
    with torch.no_grad():
        full = teacher.reverse(x, t)
        half = load_model("builtin:digits").set_inference_dtype("bfloat16").reverse(x, t)
    eps_err = ((half.eps - full.eps).norm() / full.eps.norm()).item()
    mean_err = ((half.mean - full.mean).norm() / full.mean.norm()).item()
    assert 0 < eps_err < 0.01 and mean_err < 1e-3, (eps_err, mean_err)
    assert half.eps.dtype == torch.float32
