"""Image grids as PNG (Pillow, which diffusers already depends on; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 4, pad: int = 1) -> Path:
    """Write images [N,C,H,W] in [-1, 1] as one PNG grid, each pixel enlarged ``scale`` times."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i].permute(1, 2, 0).numpy()
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
