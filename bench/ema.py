"""Cost of the EMA weight update per training step: dkdm's fused update against a per-tensor loop.

The EMA runs once per step over every tensor of the student; as a loop that is one small kernel
per tensor (hundreds of launches on a GPU for a UNet), fused it is a handful. Both are timed in
the same run on the same weights, so the ratio is comparable across noisy machines.

    python bench/ema.py                                      # default student, CPU
    python bench/ema.py --device cuda --student unet:widths=128-256-256,layers=2
"""

from __future__ import annotations

import argparse
import time

import torch


def per_tensor_update(shadow: dict, net: torch.nn.Module, decay: float) -> None:
    """The reference: the same lerp, one tensor at a time."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                shadow[k].lerp_(v.float(), 1 - decay)
            else:
                shadow[k].copy_(v)


def timed(fn, device, reps: int) -> float:
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / reps


def main() -> None:
    from dkdm.students import build_net, count_parameters
    from dkdm.ema import EMA

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="unet:widths=24-48,layers=1,groups=8")
    ap.add_argument("--shape", default="1,8,8", help="sample shape C,H,W")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    device = torch.device(a.device)
    shape = tuple(int(v) for v in a.shape.split(","))
    net = build_net(a.student, shape, 2 * shape[0]).to(device)
    ema = EMA(net, 0.999)
    reference = {k: v.clone() for k, v in ema.shadow.items()}
    fused_ms = timed(lambda: ema.update(net, 10 ** 6), device, a.reps)
    loop_ms = timed(lambda: per_tensor_update(reference, net, 0.999), device, a.reps)
    tensors = len(net.state_dict())
    print(f"{a.student} on {device}: {count_parameters(net):,} parameters in {tensors} tensors")
    print(f"EMA update: fused {fused_ms:.3f} ms, per-tensor loop {loop_ms:.3f} ms, ratio {fused_ms / loop_ms:.2f}")


if __name__ == "__main__":
    main()
