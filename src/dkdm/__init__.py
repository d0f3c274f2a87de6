"""dkdm: data-free knowledge distillation for diffusion models of any architecture.

``dkdm.distill(...)`` and ``dkdm.train(...)`` run what ``dkdm distill`` and ``dkdm train`` run,
with the same settings (``dkdm.runs``).
"""

from .runs import distill, train

__version__ = "0.1.0"
__all__ = ["distill", "train", "__version__"]
