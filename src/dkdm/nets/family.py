"""What dkdm knows of a network family it builds from a spec: the spec's fields and their defaults,
how to build the network on a data shape, the half-width student a teacher of the family gets by
default, and how its output rows are ordered. Each family module in ``nets/`` declares one
``Family``; ``nets.FAMILIES`` lists them, so a new family is its module and one line there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import DkdmError

#: Width factor of the default student: 1/sqrt(2) of every width, about half the teacher's parameters
#: (a layer's weights grow with the square of its width). Smaller digits students (231k, 164k
#: against 367k) were 1.2-1.4x behind at equal steps (docs/digits-default.md, docs/results.md);
#: a DKDM step costs a teacher forward whatever the student.
WIDTH_SCALE = 1 / math.sqrt(2)


@dataclass(frozen=True)
class Family:
    name: str
    defaults: dict  # the spec's fields (besides type) and their defaults
    build: Callable[[dict, int, int, int], nn.Module]  # (spec, channels, size or dim, out_channels)
    half: Callable[[dict, int], dict]  # (a teacher's spec, classes) -> its default student's spec
    net_type: type | None = None  # the wrapper of teachers of this family loaded from other formats
    half_of_net: Callable[[nn.Module, int], dict] | None = None  # (such a teacher's net, classes) -> spec
    patch_ordered: bool = False  # output rows ordered (patch position, channel), as a DiT's head writes them
    images: bool = True  # square C x H x W images; False: vectors of D values


def narrower(width: int, multiple: int) -> int:
    """``width`` * WIDTH_SCALE, the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, round(width * WIDTH_SCALE / multiple) * multiple)


def checked_tokens(s: dict, h: int) -> tuple[int, int, int]:
    """A transformer spec's (dit, uvit) width, heads and patch, checked against each other and the image size."""
    width, heads, patch = int(s["width"]), int(s["heads"]), int(s["patch"])
    if width % heads:
        raise DkdmError(f"{s['type']} width {width} must be divisible by heads {heads}")
    if h % patch:
        raise DkdmError(f"{s['type']} patch {patch} must divide the image size {h}")
    return width, heads, patch
