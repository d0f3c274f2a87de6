"""Adapters that load models from outside formats into dkdm (they import only the diffusion math)."""
