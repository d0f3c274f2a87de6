"""dkdm: data-free knowledge distillation for diffusion models of any architecture."""

__version__ = "0.1.0"
