"""The named choices of dkdm's settings, in one place: the modules that act on them and the command
line's ``choices=`` read the same tuples, so a new one is added here once (and nowhere drifts).

It imports nothing: the bottom layer, below even the diffusion math.
"""

#: The noise schedules (diffusion.Schedule.named), what a network predicts, its reverse variance.
SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
#: A few-step student's prediction (consistency.py): v first, its default.
FEWSTEP_PREDICTIONS = ("v_prediction", "sample", "epsilon")
#: How ``dkdm fewstep`` trains: consistency distillation on the pool (consistency.py), or distribution
#: matching with a fake score (matching.py).
FEWSTEP_OBJECTIVES = ("consistency", "matching")
#: what distribution matching's fake score starts as a copy of (``--fake-from``)
FAKE_FROM = ("student", "teacher")
#: Knowledge pools (pool.py) and how a pool's entries are prepared.
POOL_KINDS = ("iterative", "shuffled", "dynamic")
PREPARATIONS = ("auto", "exact", "sampled", "shared")
#: Storage of the pool, inference of the teacher; mixed precision of the student's training.
DTYPES = ("float32", "float16", "bfloat16")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_DECAYS = ("constant", "cosine")
#: What `dkdm convert` writes.
CONVERT_FORMATS = ("dkdm", "diffusers")
