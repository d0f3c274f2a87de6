"""Every network dkdm builds, each behind the one signature ``net(x, t, y=None) -> tensor``.

``students.py`` turns a spec into one of these; the formats (``formats/``) load
weights into them. One timestep embedding (``embedding.py``) serves the networks written here.
"""

from . import dit, mlp, unet, uvit
from .family import Family

#: Every family built from a spec, by name (a new family: its module in nets/ and its line here).
FAMILIES: dict[str, Family] = {f.name: f for f in (mlp.FAMILY, unet.FAMILY, dit.FAMILY, uvit.FAMILY)}
