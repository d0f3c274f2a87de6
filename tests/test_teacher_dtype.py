"""Reduced-precision teachers (--teacher-dtype bfloat16 / float16) on every teacher kind.

The network's weights and every input it gets run in the reduced dtype (an ADM's or an MLP's
float32 timestep embedding joins the weights' dtype); the reverse step's mathematics stays in
float32. The targets the student learns from (epsilon, mean, log-variance) then move by a bounded
amount from the float32 teacher's, and they do move: the reduced precision is really used.
"""

import pytest
import torch

import tiny_teachers as tt
from test_matrix import CustomNet

#: relative L2 change bounds (eps, mean, log-variance); measured on these random teachers at most
#: 2.2% / 0.6% / 0.09% (bf16) and 0.27% / 0.25% / 0.012% (fp16)
BOUNDS = {"bfloat16": (0.04, 0.02, 0.005), "float16": (0.005, 0.005, 0.001)}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _custom():
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel

    torch.manual_seed(0)
    return DiffusionModel(CustomNet(), Schedule.named("linear", tt.T), (3, 8, 8), variance="fixed_small",
                          clip_x0=True, num_classes=3, null_class=3).eval()


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    made = {}

    def load(kind):
        if kind == "custom":
            return _custom()
        if kind not in made:
            made[kind] = tt.make(kind, root / kind)
        return tt.load(made[kind])

    return load


@pytest.mark.parametrize("dtype", BOUNDS)
@pytest.mark.parametrize("kind", [*tt.KINDS, "custom"])
def test_reduced_precision_teacher_moves_its_targets_by_a_bounded_amount(kind, dtype, loaders):
    full_model = loaders(kind)
    g = torch.Generator().manual_seed(0)
    n = 12
    x = torch.randn((n, *full_model.sample_shape), generator=g)
    t = torch.arange(n) * (tt.T - 1) // (n - 1)  # across the whole schedule
    y = full_model.labels_for(n, g)
    half_model = loaders(kind).set_inference_dtype(dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in half_model.net.parameters())
    with torch.no_grad():
        full = full_model.reverse(x, t, y=y)
        half = half_model.reverse(x, t, y=y)
        respaced = half_model.respaced(5).reverse(x, torch.arange(n) % 5, y=y)  # keeps the dtype of its weights
    for got in (half, respaced):
        assert all(v.dtype == torch.float32 for v in (got.eps, got.mean, got.variance, got.log_variance))
    eps, mean, log_var = _rel(half.eps, full.eps), _rel(half.mean, full.mean), _rel(half.log_variance, full.log_variance)
    b_eps, b_mean, b_log_var = BOUNDS[dtype]
    assert 0 < eps < b_eps and mean < b_mean and log_var < b_log_var, (eps, mean, log_var)
    if full_model.variance == "learned_range":
        assert log_var > 0  # the learned variance comes from the reduced-precision network too
