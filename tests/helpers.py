"""Small models built in-test (no downloads), and the comparison of two runs' saved weights."""

import torch

from dkdm.diffusion import Schedule
from dkdm.model import DiffusionModel


class CountingNet(torch.nn.Module):
    """Wraps a net and counts the samples it is called on."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.samples = 0

    def forward(self, x, t):
        self.samples += x.shape[0]
        return self.net(x, t)


def tiny_teacher(steps=20, seed=0, spec="mlp:width=32,depth=1", schedule="linear"):
    torch.manual_seed(seed)
    # clipped x0 keeps an untrained teacher's trajectories bounded
    return DiffusionModel.build(spec, (2,), Schedule.named(schedule, steps), clip_x0=True,
                                extra={"data": "toy2d"}).eval()


def weights(out):
    """A run directory's saved (EMA) weights, model.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def same(a, b):
    """Two state dicts hold bit-identical tensors under the same names."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
