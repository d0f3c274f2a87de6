"""dkdm: data-free knowledge distillation for diffusion models of any architecture.

``dkdm.distill(...)``, ``dkdm.fewstep(...)`` and ``dkdm.train(...)`` run what ``dkdm distill``,
``dkdm fewstep`` and ``dkdm train`` run, with the same settings (``dkdm.runs``).
"""

from .runs import distill, fewstep, train

__version__ = "0.1.0"
__all__ = ["distill", "fewstep", "train", "__version__"]
