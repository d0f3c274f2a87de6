"""Students of any architecture, from specs, YAML blocks, or a plain nn.Module."""

import pytest
import torch

from dkdm.diffusion import Schedule
from dkdm.errors import DkdmError
from dkdm.formats import load_model, save_model
from dkdm.model import DiffusionModel
from dkdm.students import count_parameters, parse_spec


@pytest.mark.parametrize("spec,shape", [
    ("mlp:width=32,depth=2", (2,)),
    ("unet:widths=16-32,layers=1,attn=1,groups=8", (1, 8, 8)),
    ("dit:patch=2,depth=2,width=32,heads=2", (3, 8, 8)),
    ("uvit:patch=2,depth=3,width=32,heads=2", (3, 8, 8)),
    ("uvit:patch=4,depth=3,width=32,heads=2", (1, 8, 8)),
])
@pytest.mark.parametrize("variance,factor", [("learned_range", 2), ("fixed_small", 1)])
def test_students_output_the_right_channels(spec, shape, variance, factor):
    m = DiffusionModel.build(spec, shape, Schedule.named("cosine", 50), variance=variance)
    x = torch.randn(3, *shape)
    out = m(x, torch.tensor([0, 10, 49]))
    assert out.shape == (3, shape[0] * factor, *shape[1:])
    step = m.reverse(x, torch.tensor([0, 10, 49]))
    assert step.mean.shape == x.shape and torch.isfinite(step.log_variance).all()


def test_uvit_has_long_skips_tokens_for_time_and_class_and_writes_each_patch_from_its_token():
    from dkdm.students import build_net

    net = build_net("uvit:patch=2,depth=5,width=32,heads=2,classes=3", (1, 8, 8), 2)
    assert len(net.inner) == len(net.outer) == 2 and all(b.skip is not None for b in net.outer)
    assert net.pos.shape == (1, 2 + 16, 32)  # time and class tokens, then 4 x 4 patches
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2])
    out = net(x, t, y)
    assert out.shape == (2, 2, 8, 8)
    # the class and the time reach the output through their tokens
    assert not torch.allclose(out, net(x, t, torch.tensor([1, 1])))
    assert not torch.allclose(out, net(x, torch.tensor([500, 500]), y))
    # the decoder row of (patch position, channel) lands at that patch's pixel
    h = torch.zeros(2, 18, 32)
    with torch.no_grad():
        net.decoder.weight.zero_()
        net.decoder.bias.zero_()
        net.decoder.bias[1 * 2 + 1] = 1.0  # position (0, 1) in the patch, channel 1
    out = net(x, t, y)
    assert out[:, 1].sum() == 2 * 16 and out[0, 1, 0, 1] == 1 and out[0, 1, 0, 0] == 0 and out[:, 0].abs().sum() == 0


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
    save_model(m, tmp_path)
    back = load_model(tmp_path)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([1, 11])
    assert torch.equal(m.eval()(x, t), back(x, t))
    assert back.clip_x0 and back.extra["data"] == "x" and torch.equal(back.schedule.betas, m.schedule.betas)


def test_a_fresh_dit_starts_as_adaln_zero():
    """DiT's initialisation, which diffusers leaves out: every block's modulation and the output layer
    start at zero, so each block is the identity and the untrained network outputs zero; one step
    of training moves it off zero."""
    torch.manual_seed(0)
    m = DiffusionModel.build("dit:patch=2,depth=2,width=32,heads=2", (1, 8, 8), Schedule.named("cosine", 50))
    dit = m.net.dit
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 30, 49])
    assert torch.equal(m(x, t), torch.zeros(4, 2, 8, 8))
    tokens, labels = torch.randn(4, 16, 32), torch.zeros(4, dtype=torch.long)
    for block in dit.transformer_blocks:
        assert torch.equal(block(tokens, timestep=t, class_labels=labels), tokens)
    # the paper's Xavier for linear layers, not PyTorch's default (bound 1/sqrt(fan_in) = 0.18 here)
    q = dit.transformer_blocks[0].attn1.to_q.weight
    assert q.abs().max() > 1 / 32 ** 0.5 and not dit.transformer_blocks[0].attn1.to_q.bias.any()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        ((m(x, t)[:, :1] - x) ** 2).mean().backward()
        opt.step()
    assert m(x, t).abs().max() > 0 and dit.transformer_blocks[0].norm1.linear.weight.any()


def test_small_patch_grids_get_distinct_positions():
    """DiT's sin-cos table is sized for 16 x 16 patch grids: on a 4 x 4 grid diffusers' own table makes
    neighbours 98% alike; the default spec spreads small grids over 16 positions, larger grids and
    pos_grid=0 keep diffusers' table exactly."""
    from diffusers import DiTTransformer2DModel

    def table(spec, size):
        return DiffusionModel.build(spec, (1, size, size), Schedule.named("cosine", 10)).net.dit.pos_embed.pos_embed[0]

    def neighbours(pe):
        return torch.nn.functional.cosine_similarity(pe[0], pe[1], dim=0).item()

    stretched, plain = table("dit:patch=2,width=64,heads=2", 8), table("dit:patch=2,width=64,heads=2,pos_grid=0", 8)
    own = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=1).pos_embed.pos_embed[0]
    assert torch.equal(plain, own) and neighbours(own) > 0.975
    assert neighbours(stretched) < 0.87
    big = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, num_layers=1,
                                sample_size=32, patch_size=2, num_embeds_ada_norm=1).pos_embed.pos_embed[0]
    assert torch.equal(table("dit:patch=2,width=64,heads=2", 32), big)


def test_a_dit_saved_before_pos_grid_existed_loads_with_its_own_positions(tmp_path):
    import json

    m = DiffusionModel.build("dit:patch=2,depth=1,width=16,heads=2,pos_grid=0", (1, 8, 8), Schedule.named("cosine", 12))
    save_model(m, tmp_path)
    meta = json.loads((tmp_path / "dkdm_model.json").read_text())
    del meta["spec"]["pos_grid"]  # as dkdm wrote DiTs before the field existed
    (tmp_path / "dkdm_model.json").write_text(json.dumps(meta))
    back = load_model(tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 11])
    assert torch.equal(back.net.dit.pos_embed.pos_embed, m.net.dit.pos_embed.pos_embed)
    assert torch.equal(back(x, t), m.eval()(x, t))


def test_a_small_dit_learns_digits(tmp_path):
    """A 30k-parameter DiT trained 200 steps on digits predicts held-out noise with error < 0.32
    (untrained: 1.0; measured 0.27)."""
    from dkdm.data import DataSource, Digits
    from dkdm.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    sched = Schedule.named("cosine", 100)
    m = DiffusionModel.build("dit:patch=2,depth=2,width=32,heads=2", (1, 8, 8), sched)
    Trainer(m, DataSource(Digits(), sched, 64, seed=0), TrainConfig(steps=200, lr=3e-3, warmup=20, grad_clip=0,
            ckpt_every=10**6, log_every=10**6), tmp_path / "run", progress=False).train()
    x0, g, errors = Digits("test").images, torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for step in range(0, 100, 5):
            eps, t = torch.randn(x0.shape, generator=g), torch.full((len(x0),), step)
            errors.append(((m.eval()(sched.q_sample(x0, t, eps), t)[:, :1] - eps) ** 2).mean().item())
    assert sum(errors) / len(errors) < 0.32


def test_a_family_registered_in_nets_builds_distils_and_gets_a_default_student(tmp_path, monkeypatch):
    """docs/extending.md's student family: a Family in nets.FAMILIES (its defaults, builder and
    half-width rule) is all parse_spec, build_net, the default student and distill need."""
    import torch
    from torch import nn

    from dkdm import nets, specs, students
    from dkdm.cli import main
    from dkdm.nets.family import Family, narrower

    class Tiny(nn.Module):
        def __init__(self, c, out, width):
            super().__init__()
            self.inp, self.out = nn.Conv2d(c, width, 3, padding=1), nn.Conv2d(width, out, 3, padding=1)
            self.temb = nn.Embedding(1000, width)

        def forward(self, x, t, y=None):
            return self.out(torch.nn.functional.silu(self.inp(x) + self.temb(t)[:, :, None, None]))

    family = Family("tiny", {"width": 16, "classes": 0}, lambda s, c, h, out: Tiny(c, out, int(s["width"])),
                    lambda spec, classes: {**spec, "width": narrower(int(spec["width"]), 4), "classes": classes})
    monkeypatch.setitem(nets.FAMILIES, "tiny", family)
    monkeypatch.setitem(specs.SPEC_DEFAULTS, "tiny", family.defaults)
    monkeypatch.setattr(specs, "KINDS", (*specs.KINDS, "tiny"))
    spec = specs.parse_spec("tiny:width=12")
    assert spec == {"type": "tiny", "width": 12, "classes": 0} and specs.family_of(spec) == "tiny"
    assert students.build_net(spec, (3, 8, 8), 6)(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)
    teacher = tmp_path / "teacher"
    assert main(["train", "--data", "digits", "--model", "tiny:width=16", "--steps", "2", "--no-progress",
                 "--no-report", "--out", str(teacher)]) == 0
    from dkdm.formats import load_model

    assert students.default_student_spec(load_model(teacher)) == {"type": "tiny", "width": 12, "classes": 0}
    assert main(["distill", "--teacher", str(teacher), "--steps", "2", "--batch", "4", "--rho", "0.01", "--prep-steps",
                 "2", "--no-progress", "--no-report", "--out", str(tmp_path / "student")]) == 0
    assert load_model(tmp_path / "student").spec == {"type": "tiny", "width": 12, "classes": 0}
