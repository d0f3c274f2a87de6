"""Every network dkdm builds, each behind the one signature ``net(x, t, y=None) -> tensor``.

``students.py`` turns a spec into one of these; the formats (``formats/``) load
weights into them. One timestep embedding (``embedding.py``) serves the networks written here.
"""
