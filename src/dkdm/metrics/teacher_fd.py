"""The data-free sample score: the Fréchet distance between student and teacher samples in the
teacher network's own features.

FID needs a feature network that knows the data (Inception for natural images, the digits
classifier for digits) and a data set to compare with; a user distilling their own teacher may
have neither. The teacher itself is a network trained on that data: a denoiser's middle
activations on a slightly noised image encode what the image shows (diffusion UNets' middle
features at small t are good linear-probe representations, Xiang et al. 2023, "Denoising
diffusion autoencoders are unified self-supervised learners"). So each sample is noised to a
fixed small t with a fixed noise, passed once through the teacher, and the activation of its
lowest-resolution block (UNet mid block, ADM middle block, last DiT block, the MLP's last hidden
layer) is averaged over positions. Student and teacher samples are drawn from the same noise, so a
student equal to its teacher scores exactly 0 at any sample count. A custom network names its
feature module with ``layer``; without one, the lowest-resolution, widest 4-D activation is used.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..students import unwrap

#: Where features are taken: t = round(T_FRACTION * (T - 1)) of the teacher's schedule.
T_FRACTION = 0.1
NOISE_SEED = 12345  # the fixed noise that takes samples to that t (the same for every set)


def default_layer(net: nn.Module) -> str | None:
    """The name of the feature module of a known architecture (None: choose by shape)."""
    from ..nets.mlp import MLPNet

    inner, _ = unwrap(net, 0)
    names = dict(inner.named_modules())
    for name in ("unet.mid_block", "adm.middle_block"):
        if name in names:
            return name
    if isinstance(inner, MLPNet):
        return "out"
    if "dit.transformer_blocks" in names:
        return f"dit.transformer_blocks.{len(names['dit.transformer_blocks']) - 1}"
    return None


def _pool(h: torch.Tensor) -> torch.Tensor:
    """Average over positions: [N,C,H,W] -> [N,C]; DiT tokens [N,L,D] -> [N,D]; [N,D] as is."""
    h = h.float()
    if h.dim() == 4:
        return h.mean((2, 3))
    if h.dim() == 3:
        return h.mean(1)
    return h.flatten(1)


class TeacherFeatures:
    """Pooled activations of one teacher module on samples noised to a fixed small t."""

    def __init__(self, teacher, layer: str | None = None, t_fraction: float = T_FRACTION):
        self.teacher = teacher
        T = teacher.schedule.num_steps
        self.t = int(round(t_fraction * (T - 1)))
        self.net, self.t_net = unwrap(teacher.net, self.t)
        self.layer = layer or default_layer(teacher.net)
        modules = dict(self.net.named_modules())
        if self.layer is not None and self.layer not in modules:
            from ..errors import DkdmError

            raise DkdmError(f"feature layer {self.layer!r} is not a module of the teacher's network")
        self._module = modules.get(self.layer) if self.layer else None
        # an MLP's last hidden layer is the input of its output head, hence a pre-hook there
        self._take_input = self.layer == "out"

    def describe(self) -> dict:
        return {"layer": self.layer or "auto", "t": self.t}

    def _forward(self, x, y):
        dt = self.teacher.inference_dtype
        t = torch.full((len(x),), self.t_net, dtype=torch.long, device=x.device)
        x = x if dt is None else x.to(dt)
        return self.net(x, t) if y is None else self.net(x, t, y)

    def _pick_by_shape(self, x, y) -> nn.Module:
        """For a custom network: the module with the lowest-resolution, widest 4-D output."""
        seen: list[tuple[tuple, nn.Module, str]] = []
        hooks = []
        for order, (name, m) in enumerate(self.net.named_modules()):
            if not name:
                continue

            def hook(mod, inp, out, name=name, order=order):
                if torch.is_tensor(out) and out.dim() == 4:
                    seen.append(((out.shape[2] * out.shape[3], -out.shape[1], order), mod, name))
            hooks.append(m.register_forward_hook(hook))
        try:
            self._forward(x, y)
        finally:
            for h in hooks:
                h.remove()
        if not seen:
            self.layer = "samples"
            return None
        _, module, self.layer = min(seen, key=lambda s: s[0])
        return module

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        """Features [N, D] (float64, on the CPU) of ``samples`` [N, ...]; sample i always gets the same noise."""
        device = next(self.teacher.parameters()).device
        g = torch.Generator().manual_seed(NOISE_SEED)
        noise = torch.randn(samples.shape, generator=g)
        sched = self.teacher.schedule
        feats = []
        for i in range(0, len(samples), batch):
            x0 = samples[i:i + batch].to(device).float()
            t = torch.full((len(x0),), self.t, dtype=torch.long, device=device)
            x = sched.q_sample(x0, t, noise[i:i + batch].to(device))
            y = None if labels is None else labels[i:i + batch].to(device)
            if self.layer is None:
                self._module = self._pick_by_shape(x, y)
            if self._module is None:  # no 4-D activation at all: the noised samples themselves
                feats.append(x.flatten(1).double().cpu())
                continue
            got = []
            if self._take_input:
                hook = self._module.register_forward_pre_hook(lambda m, inp: got.append(inp[0]))
            else:
                hook = self._module.register_forward_hook(lambda m, inp, out: got.append(out[0] if isinstance(out, tuple) else out))
            try:
                self._forward(x, y)
            finally:
                hook.remove()
            feats.append(_pool(got[0]).double().cpu())
        return torch.cat(feats)


def weights_fingerprint(net: nn.Module) -> str:
    """A hash of a network's weights (any format a teacher came in), for caching its statistics."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

