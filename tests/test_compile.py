"""Every built-in network traces into one graph (no graph break), and --compile compiles its repeated
blocks in place: the GPU machine only measures compile time; what can break is checked here."""

import functools

import pytest
import torch
import torch._dynamo as dynamo

from dkdm.compiling import compile_regions
from dkdm.students import build_net

ADM = "adm:num_channels=32,num_res_blocks=1,channel_mult=1-2,attention_resolutions=4,num_head_channels=16"
NETS = {  # conditional where the family conditions: the label path is the longer one
    "unet": ("unet:widths=8-16,layers=1,groups=4,attn=1,classes=3", (3, 8, 8)),
    "dit": ("dit:patch=2,depth=1,width=16,heads=2,classes=3", (3, 8, 8)),
    "uvit": ("uvit:patch=2,depth=3,width=16,heads=2,classes=3", (3, 8, 8)),
    "adm": (ADM + ",class_cond=true,num_classes=3", (3, 8, 8)),
    "mlp": ("mlp:width=16,depth=1", (2,)),
}


def _inputs(name, shape):
    x, t = torch.randn(4, *shape), torch.tensor([0, 5, 10, 19])
    return (x, t) if name == "mlp" else (x, t, torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("name", NETS)
def test_every_builtin_network_traces_without_a_graph_break(name):
    spec, shape = NETS[name]
    net = build_net(spec, shape, 2 * shape[0])
    dynamo.reset()
    explained = dynamo.explain(net)(*_inputs(name, shape))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


# unet: res-blocks 1 + 1 down, 2 + 2 up, 2 middle; attentions 1 down, 2 up, 1 middle (level 1 only).
# adm: res-blocks 2 in, 2 middle, 4 out; attention blocks 1 in, 1 middle, 2 out (at resolution 4).
# dit: one transformer block; uvit: 1 in, 1 middle, 1 out; mlp: none, so compiled whole.
@pytest.mark.parametrize("name,regions", [("unet", 12), ("dit", 1), ("uvit", 3), ("adm", 12), ("mlp", 1)])
def test_compile_regions_compiles_repeated_blocks_in_place(monkeypatch, name, regions):
    # the eager backend traces like inductor but generates no code: the plumbing, fast
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    spec, shape = NETS[name]
    torch.manual_seed(0)
    net = build_net(spec, shape, 2 * shape[0])
    keys = list(net.state_dict())
    args = _inputs(name, shape)
    with torch.no_grad():
        want = net(*args)
    dynamo.reset()
    assert compile_regions(net) == regions
    compiled = [m for m in net.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == regions  # none nested inside another
    assert list(net.state_dict()) == keys  # no wrapper: checkpoints and the EMA see the plain names
    with torch.no_grad():
        torch.testing.assert_close(net(*args), want)


@pytest.mark.slow
@pytest.mark.parametrize("name", NETS)
def test_every_builtin_network_compiles_by_regions_with_inductor_on_the_cpu(name):
    # what the GPU machine would otherwise find out first: inductor builds every region's kernels
    # here, and the compiled network computes what the plain one does (float32 rounding aside)
    spec, shape = NETS[name]
    torch.manual_seed(0)
    net = build_net(spec, shape, 2 * shape[0])
    for p in net.parameters():  # zero-initialised heads would hide a wrong kernel
        p.data.normal_(0, 0.05)
    args = _inputs(name, shape)
    with torch.no_grad():
        want = net(*args)
        dynamo.reset()
        compile_regions(net)
        got = net(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
