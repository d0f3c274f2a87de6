"""The exponential moving average of a student's weights: what a run saves as its model."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the weights, with diffusers' warm-up of the decay.

    Hand-written (a few dozen lines) because its state must be a flat tensor dict for safetensors.
    The live tensors are paired with their shadows once, so a step is one fused lerp and no
    walk over the module (a state_dict() per step costs an op per tensor).
    """

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
        self._bind(net)

    def _bind(self, net: torch.nn.Module) -> None:
        live = net.state_dict(keep_vars=True)  # the parameters and buffers themselves, not copies
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        self._net = net
        self._shadows = [self.shadow[k] for k in floats]
        self._live = [live[k] for k in floats]
        self._cast = any(v.dtype != torch.float32 for v in self._live)
        self._copied = [(self.shadow[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a saved EMA in place (the pairs made once stay valid)."""
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        """One fused lerp over all float tensors: a per-tensor loop costs a kernel launch each on a GPU."""
        if net is not self._net:
            self._bind(net)
        d = min(self.decay, (1 + step) / (10 + step))
        live = [v.float() for v in self._live] if self._cast else self._live
        if live:
            torch._foreach_lerp_(self._shadows, live, 1 - d)
        for shadow, v in self._copied:
            shadow.copy_(v)
