"""Students of any architecture, from specs, YAML blocks, or a plain nn.Module."""

import pytest
import torch

from dkdm.diffusion import Schedule
from dkdm.errors import DkdmError
from dkdm.model import DiffusionModel, load_model
from dkdm.students import count_parameters, parse_spec


@pytest.mark.parametrize("spec,shape", [
    ("mlp:width=32,depth=2", (2,)),
    ("unet:widths=16-32,layers=1,attn=1,groups=8", (1, 8, 8)),
    ("dit:patch=2,depth=2,width=32,heads=2", (3, 8, 8)),
])
@pytest.mark.parametrize("variance,factor", [("learned_range", 2), ("fixed_small", 1)])
def test_students_output_the_right_channels(spec, shape, variance, factor):
    m = DiffusionModel.build(spec, shape, Schedule.named("cosine", 50), variance=variance)
    x = torch.randn(3, *shape)
    out = m(x, torch.tensor([0, 10, 49]))
    assert out.shape == (3, shape[0] * factor, *shape[1:])
    step = m.reverse(x, torch.tensor([0, 10, 49]))
    assert step.mean.shape == x.shape and torch.isfinite(step.log_variance).all()


def test_spec_fields_reach_the_network():
    small = DiffusionModel.build("unet:widths=8-16,layers=1", (1, 8, 8), Schedule.named("cosine", 10))
    large = DiffusionModel.build("unet:widths=32-64,layers=2,attn=1", (1, 8, 8), Schedule.named("cosine", 10))
    assert count_parameters(large.net) > 10 * count_parameters(small.net)
    blocks = [type(b).__name__ for b in large.net.unet.down_blocks]
    assert blocks == ["DownBlock2D", "AttnDownBlock2D"]


def test_yaml_block_and_string_spec_agree():
    a = parse_spec("unet:widths=16-32,attn=1")
    b = parse_spec({"type": "unet", "widths": [16, 32], "attn": [1]})
    c = parse_spec('{type: unet, widths: [16, 32], attn: [1]}')
    assert a == b == c


@pytest.mark.parametrize("bad,msg", [
    ("transformer", "unknown model type"),
    ("mlp:width", "expected key=value"),
    ("mlp:colour=red", "unknown field"),
    ("{type: [", "not valid YAML"),
])
def test_bad_specs_say_what_is_wrong(bad, msg):
    with pytest.raises(DkdmError, match=msg):
        parse_spec(bad)


def test_architecture_must_fit_the_data():
    with pytest.raises(DkdmError, match="vector data"):
        DiffusionModel.build("mlp", (1, 8, 8), Schedule.named("cosine", 10))
    with pytest.raises(DkdmError, match="square images"):
        DiffusionModel.build("unet", (2,), Schedule.named("cosine", 10))
    with pytest.raises(DkdmError, match="divisible"):
        DiffusionModel.build("unet:widths=16-32-32-32", (1, 4, 4), Schedule.named("cosine", 10))


class Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None].float() / 10], 1))


def test_any_module_trains_through_the_python_api(tmp_path):
    from dkdm.data import DataSource, Toy2D
    from dkdm.trainer import TrainConfig, Trainer

    sched = Schedule.named("linear", 10)
    model = DiffusionModel(Custom(), sched, (2,), variance="learned_range")
    before = model.net.lin.weight.detach().clone()
    Trainer(model, DataSource(Toy2D(), sched, 16), TrainConfig(steps=3, lr=1e-2), tmp_path / "run",
            progress=False).train()
    assert not torch.equal(before, model.net.lin.weight)
    with pytest.raises(DkdmError, match="custom nn.Module"):
        load_model(tmp_path / "run")
    back = load_model(tmp_path / "run", net=Custom())
    assert back.variance == "learned_range" and back.net.lin.weight.shape == (4, 3)


def test_model_directory_round_trip(tmp_path):
    m = DiffusionModel.build("dit:patch=2,depth=1,width=16,heads=2", (1, 4, 4), Schedule.named("cosine", 12),
                             clip_x0=True, extra={"data": "x"})
    m.save(tmp_path)
    back = load_model(tmp_path)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([1, 11])
    assert torch.equal(m.eval()(x, t), back(x, t))
    assert back.clip_x0 and back.extra["data"] == "x" and torch.equal(back.schedule.betas, m.schedule.betas)
