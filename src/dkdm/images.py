"""Image grids as PNG (Pillow, which diffusers already depends on; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def _grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Images [N,C,H,W] in [-1, 1] as one uint8 array [rows, cols, C] with white gaps."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i].permute(1, 2, 0).numpy()
    return grid


def _save(grid: np.ndarray, path, scale: int) -> Path:
    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 4, pad: int = 1) -> Path:
    """Write images [N,C,H,W] in [-1, 1] as one PNG grid, each pixel enlarged ``scale`` times."""
    return _save(_grid(images, nrow, pad), path, scale)


def save_side_by_side(sets: list[torch.Tensor], titles: list[str], path, scale: int | None = None) -> Path:
    """Sets of images [N,C,H,W] as grids side by side, each under its title (teacher | student):
    image i of every set sits at the same place in its grid."""
    from PIL import Image, ImageDraw

    h = sets[0].shape[-1]
    scale = scale or max(1, 64 // h)  # small images enlarged to at least 64 pixels
    grids = [_grid(s, nrow=math.ceil(math.sqrt(len(s)))) for s in sets]
    gap, head = 8, 14
    gh, gw = max(g.shape[0] for g in grids), sum(g.shape[1] for g in grids)
    c = grids[0].shape[2]
    canvas = Image.new("RGB", ((gw + gap * (len(grids) - 1)) * scale, gh * scale + head), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for g, title in zip(grids, titles):
        img = Image.fromarray(g[..., 0] if c == 1 else g).convert("RGB")
        canvas.paste(img.resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST), (x, head))
        draw.text((x + 2, 1), title, fill="black")
        x += (g.shape[1] + gap) * scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
