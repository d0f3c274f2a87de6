"""Small models built in-test (no downloads)."""

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
