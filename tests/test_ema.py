"""The EMA of the weights against a float64 recurrence written out independently."""
import torch

from dkdm.ema import EMA


def test_ema_follows_the_warmed_up_decay_and_copies_integer_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3))
    decay = 0.9
    ema = EMA(net, decay)
    ref = {k: v.double().clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    for step in range(1, 30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net[1](torch.randn(5, 4, 3, 3))
        ema.update(net, step)
        d = min(decay, (1 + step) / (10 + step))
        for k, v in net.state_dict().items():
            if k in ref:
                ref[k] = d * ref[k] + (1 - d) * v.double()
    for k, v in ref.items():
        torch.testing.assert_close(ema.shadow[k].double(), v, rtol=1e-5, atol=1e-6)
    assert ema.shadow["1.num_batches_tracked"].item() == net.state_dict()["1.num_batches_tracked"].item() == 29
    assert any(not torch.allclose(ema.shadow[k].double(), net.state_dict()[k].double()) for k in ref)
