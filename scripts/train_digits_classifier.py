"""Train the digits feature network shipped in dkdm/assets (used by digits-FID).

    python scripts/train_digits_classifier.py      # prints the test accuracy

Trains on the digits *train* split only, with random one-pixel shifts, and writes
src/dkdm/assets/digits_classifier.safetensors.
"""

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dkdm.data import Digits
from dkdm.metrics.digits import WEIGHTS, DigitsClassifier


def shift(x, g):
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (1, 1, 1, 1), value=-1), (dy, dx), (2, 3))[:, :, 1:-1, 1:-1]


def main(epochs: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = Digits("train"), Digits("test")
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(net(shift(train.images[idx], g)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(test.images).argmax(1) == test.labels).float().mean().item()
        train_acc = (net(train.images).argmax(1) == train.labels).float().mean().item()
    print(f"digits classifier: train accuracy {train_acc:.4f}, test accuracy {acc:.4f}")
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(WEIGHTS))
    return acc


if __name__ == "__main__":
    main()
