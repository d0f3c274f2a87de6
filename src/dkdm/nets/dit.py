"""diffusers' ``DiTTransformer2DModel`` as a dkdm network, with what a fresh small DiT needs:
DiT's own initialisation and a position table spread over small patch grids."""

from __future__ import annotations

import math

import torch
from torch import nn

from .family import WIDTH_SCALE, Family, checked_tokens, narrower


class DiTNet(nn.Module):
    """diffusers ``DiTTransformer2DModel``; unconditional models use one class. Label dropout is
    off (dkdm never drops labels while training), but a pretrained table's null row is kept."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit
        for m in dit.modules():
            if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                m.dropout_prob = 0.0

    def forward(self, x, t, y=None):
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if y is None else y
        return self.dit(x, timestep=t, class_labels=labels, return_dict=False)[0]


def init_dit(dit) -> None:
    """Give a fresh diffusers ``DiTTransformer2DModel`` DiT's adaLN-Zero initialisation.

    diffusers builds the DiT with PyTorch's default initialisation and leaves it so (it loads
    pretrained weights over it): every block's modulation and the output head start random.
    As in the DiT paper, linear layers and the patch embedding start Xavier-uniform with zero
    bias, the label table N(0, 0.02), and every block's adaLN modulation and the output layer
    (its modulation and projection) zero, so each block starts as the identity and the
    network's output at zero. One departure: the paper draws the timestep MLP from N(0, 0.02),
    which leaves the time signal in the modulation ~0.02 per channel at the start; it is Xavier
    here like every other linear layer (digits, 1,500 steps: held-out epsilon error 0.1736
    against 0.1770, bench/quality/analysis.md).
    """
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = dit.pos_embed.proj  # a patch-sized convolution: a linear layer on each patch
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in dit.transformer_blocks:
        nn.init.normal_(block.norm1.emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def stretch_positions(dit, pos_grid: int) -> None:
    """Number a patch grid smaller than ``pos_grid`` in the sin-cos table as if it spanned that grid.

    DiTTransformer2DModel numbers its g x g patches 0..g-1 in a sin-cos table whose frequencies
    DiT chose for 16 x 16 patch grids (256-pixel images, patch 2 on 32 x 32 latents). On a small
    grid most of those frequencies barely move: on 8 x 8 digits at patch 2 (g = 4) neighbouring
    patches' embeddings are 98% alike (cosine), and the network has to learn where each patch is
    before it can denoise. diffusers' own table function takes the grid it spans as ``base_size``;
    giving it ``pos_grid`` spreads the g patches over pos_grid positions (digits, 1,500 steps:
    digits-FID 53 against 73 with the default table, bench/quality/analysis.md). Grids of
    ``pos_grid`` patches or more keep diffusers' table unchanged; ``pos_grid=0`` always keeps it.
    The table is a non-persistent buffer, so the spec, not the weights, says which one a model has.
    """
    pe = dit.pos_embed
    if not pos_grid or pe.height >= pos_grid:
        return
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe.base_size = pos_grid
    table = get_2d_sincos_pos_embed(pe.pos_embed.shape[-1], pe.height, base_size=pos_grid, output_type="pt")
    pe.pos_embed = table.float().unsqueeze(0).to(pe.pos_embed.device)


def has_diffusers_positions(dit) -> bool:
    """Whether a DiT numbers its patches as DiTTransformer2DModel does (a DiTPipeline can hold it)."""
    return dit.pos_embed.base_size == dit.pos_embed.height


def build(s: dict, c: int, h: int, out_channels: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    width, heads, patch = checked_tokens(s, h)
    dit = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=c,
        out_channels=out_channels, num_layers=int(s["depth"]), sample_size=h, patch_size=patch,
        num_embeds_ada_norm=int(s["classes"]) or 1,
    )
    init_dit(dit)
    stretch_positions(dit, int(s["pos_grid"]))
    return DiTNet(dit)


def _half(width: int, heads: int, depth: int, patch: int, classes: int) -> dict:
    # fewer heads at about the teacher's head size; DiT's sin-cos position embedding needs width % 4 == 0
    heads = max(1, round(heads * WIDTH_SCALE))
    step = heads * 4 // math.gcd(heads, 4)
    return {"type": "dit", "patch": patch, "depth": depth, "width": narrower(width, step), "heads": heads,
            "classes": classes}


def _half_of_net(net: DiTNet, classes: int) -> dict:
    c = net.dit.config
    return _half(c.num_attention_heads * c.attention_head_dim, c.num_attention_heads, c.num_layers, c.patch_size,
                 classes)


FAMILY = Family("dit", {"patch": 2, "depth": 4, "width": 128, "heads": 4, "pos_grid": 16, "classes": 0}, build,
                lambda spec, classes: _half(spec["width"], spec["heads"], spec["depth"], spec["patch"], classes),
                DiTNet, _half_of_net, patch_ordered=True)
