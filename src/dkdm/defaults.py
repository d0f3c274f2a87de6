"""The optimisation settings of a distillation run that the user leaves out, derived from the
student and the problem (never from the name of a data set), each with the reason it is printed with.

One rule for every teacher: what the student is (its parameter count) and what the problem is (the
teacher's number of diffusion steps T, the size of one sample). Measured on the digits teachers of
three families (docs/defaults.md); the scaling beyond digits is reasoned, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


#: The step budget, in training samples per diffusion step per sample value: 1,200 steps of batch
#: 128 on 8x8 digits at T = 1000 with the learning rate's cosine decay (docs/defaults.md, issue 26;
#: 6.0 with a constant learning rate before).
SAMPLES_PER_STEP_VALUE = 2.4
MIN_STEPS, MAX_STEPS = 1000, 400_000
#: The paper's batch and pool (CIFAR-10, 32x32 RGB: rho 0.4); a smaller sample keeps a pool of
#: half the paper's (rho 0.2), the 25,600 entries that digits' pool had at batch 64 and rho 0.4.
#: Measured (docs/questions.md, rho): for digits teachers of 0.23M / 0.92M / 3.7M the smallest pool with
#: no measurable cost is rho 0.1 / 0.1-0.2 / 0.2, and no larger pool beat rho 0.2 beyond the seeds' spread.
PAPER_BATCH, PAPER_SAMPLE, PAPER_RHO, SMALL_RHO = 128, 3 * 32 * 32, 0.4, 0.2
#: Teacher steps of the sampler that draws each pool entry's x0 in sampled preparation (digits-FID
#: of the teacher's K-step samples over 3 seeds: K = 10: 9.4, 25: 8.9, 100: 10.8; docs/results.md).
PREP_STEPS = 10
LR_MAX, LR_MIN, LR_PARAMS = 1e-3, 1e-4, 1_000_000
#: Student families with a convolutional down-sampling path, for which the budget and learning rate
#: above were measured (issue 26). Every other family (DiT, U-ViT, a network named by its import
#: path) learned more slowly per training sample at digits scale (docs/questions.md: at the UNet's
#: budget a DiT scored 3.4x, a U-ViT 17x, a ConvMixer 2.7x the UNet student's digits-FID), so it gets
#: SLOW_BUDGET_FACTOR x the step budget (6.0 samples per step and value, the budget these families
#: met 1.2-1.4x the teacher at before issue 26) and a learning rate up to SLOW_LR_FACTOR x the rule's,
#: tapering back to the rule by ~9M parameters (measured only below 1M).
CONV_FAMILIES = ("unet", "adm", "mlp")
SLOW_BUDGET_FACTOR, SLOW_LR_FACTOR = 2.5, 3.0
#: Families that need more than SLOW_BUDGET_FACTOR: at 5x a UNet's budget the U-ViT and the DiT came
#: from 1.59x / 1.44x to 1.16x / 1.10x the UNet student (mean of 3 seeds); the evidence, the few-step
#: runs this doubles too, and the cost are in docs/defaults.md.
FAMILY_BUDGET_FACTORS = {"uvit": 5.0, "dit": 5.0}
EMA = 0.9999
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Setting:
    value: object
    why: str


def _millions(n: int) -> str:
    return f"{n / 1e6:.2g}M"


def step_budget(num_steps: int, sample_numel: int, batch: int, family: str = "unet") -> int:
    """Fixed training steps: SAMPLES_PER_STEP_VALUE * T * sample values / batch (times
    ``budget_factor(family)``), within [MIN_STEPS, MAX_STEPS]. Every diffusion step gets the same
    number of training samples per value of a sample: 1,200 steps on digits at batch 128 (6,000 for
    a DiT), 57,600 on CIFAR-10."""
    per_value = SAMPLES_PER_STEP_VALUE * budget_factor(family)
    return int(min(MAX_STEPS, max(MIN_STEPS, round(per_value * num_steps * sample_numel / batch))))


def learning_rate(student_params: int, family: str = "unet") -> float:
    """1e-3 * sqrt(1M / parameters), within [1e-4, 1e-3]: 1e-3 for students up to 1M parameters
    (digits), ~2e-4 at 35M (DDPM's CIFAR-10 2e-4), 1e-4 from 100M (ADM, DiT, the paper's 1e-4).
    A family outside ``CONV_FAMILIES``: 3e-3 * 1M / parameters, within [that rule, 3e-3]."""
    base = min(LR_MAX, max(LR_MIN, LR_MAX * math.sqrt(LR_PARAMS / max(1, student_params))))
    if family in CONV_FAMILIES:
        return base
    top = SLOW_LR_FACTOR * LR_MAX
    return max(base, min(top, top * LR_PARAMS / max(1, student_params)))


def budget_factor(family: str) -> float:
    """The step budget's multiple for a student family: 1, or outside CONV_FAMILIES SLOW_BUDGET_FACTOR
    (FAMILY_BUDGET_FACTORS where a family measured needs more)."""
    return 1.0 if family in CONV_FAMILIES else FAMILY_BUDGET_FACTORS.get(family, SLOW_BUDGET_FACTOR)


def warmup_steps(steps: int) -> int:
    """Linear learning-rate warm-up over a 50th of the run, at least 200 and at most 5,000 steps."""
    return min(5000, max(200, steps // 50))


def distill_defaults(student_params: int, sample_shape, num_steps: int, given: dict | None = None,
                     family: str = "unet") -> dict[str, Setting]:
    """The settings of a distillation that ``given`` (the user's flags and config: a value or None)
    leaves open: batch, rho, steps (the fixed budget, also --steps auto's yardstick), lr, lr_decay,
    warmup, ema and grad_clip. ``given`` values win and feed the rules that depend on them (warm-up
    follows the given steps, the budget the given batch). ``family``: the student's
    (``students.family_of``), for the budget and learning rate of families outside CONV_FAMILIES."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    numel = math.prod(int(d) for d in sample_shape)
    out: dict[str, Setting] = {}
    small = numel < PAPER_SAMPLE
    out["batch"] = Setting(PAPER_BATCH, "the paper's; on a CPU 1.3x the samples/s of batch 64 for the digits student")
    out["rho"] = Setting(SMALL_RHO if small else PAPER_RHO,
                         f"under {PAPER_SAMPLE:,} values a sample half the paper's pool, 25,600 entries at batch 128"
                         if small else "the paper's, from 3,072 values a sample (its 32x32 RGB)")
    batch = int(given.get("batch", out["batch"].value))
    budget = step_budget(num_steps, numel, batch, family)
    per_value = SAMPLES_PER_STEP_VALUE * budget_factor(family)
    slow = "" if family in CONV_FAMILIES else f" (family {family}: {budget_factor(family):g}x a UNet's, docs/questions.md)"
    out["steps"] = Setting(budget, f"{per_value:g} training samples per diffusion step and sample value{slow}: "
                                   f"{per_value:g} x T={num_steps} x {numel} values / batch {batch}")
    steps = given.get("steps", budget)
    steps = budget if steps == "auto" else int(steps)
    lr = learning_rate(student_params, family)
    out["lr"] = Setting(lr, f"for a {_millions(student_params)}-parameter student: 1e-3 x sqrt(1M / parameters) in [1e-4, 1e-3]"
                        if lr == learning_rate(student_params) else
                        f"for a {_millions(student_params)}-parameter student of family {family}: 3e-3 x 1M / parameters, "
                        f"at most 3e-3 and at least a UNet's rule (docs/questions.md)")
    out["lr_decay"] = Setting("cosine", "to 0 at the last step: a short run ends on the weights a long one reaches")
    out["warmup"] = Setting(warmup_steps(steps), f"a 50th of {steps:,} steps, in [200, 5000]")
    cap = round((10 * EMA - 1) / (1 - EMA))  # the step where (1+s)/(10+s) reaches EMA
    out["ema"] = Setting(EMA, f"warmed up as (1+s)/(10+s): it averages the last ~11% of the steps until step {cap:,}")
    out["grad_clip"] = Setting(GRAD_CLIP, "AdamW is nearly blind to the gradient's scale: clipping only trims spikes")
    return {k: v for k, v in out.items() if k not in given}


def describe(settings: dict[str, Setting]) -> str:
    """One line for the start of a run: each default with its reason."""
    def text(v):
        return f"{v:g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    return "; ".join(f"{k.replace('_', '-')} {text(s.value)} ({s.why})" for k, s in settings.items())


#: ``dkdm fewstep``: consistency distillation from a DKDM student, measured on digits (docs/few-step.md).
#: Steps: distill's budget for every K, with the sampler's geometric timesteps (consistency.sampler_timesteps):
#: 1,200 steps scored 0.75-1.37x the teacher's 100-step digits-FID at 4 steps and 0.71-1.46x at 8 over
#: 3 seeds of two teachers, both stages 1.83-1.87x distill's wall (LCMScheduler's even spacing had needed
#: 2,400 steps, 2.5x the wall). lr 2e-4 (a fifth of distill's 1e-3) against 5e-4 and 1e-3: 1-step 36 / 42 / 100.
FEWSTEP_STEPS_FACTOR, FEWSTEP_LR_FACTOR = 1, 0.2


#: The most sampler steps distribution matching is the default for (docs/few-step.md, digits, 3 seeds
#: of two teachers): at 1 and 2 steps it scored 1.24-1.81x / 1.16-1.51x the teacher's 100-step
#: digits-FID where consistency scored 1.53-3.85x / 1.24-1.83x, at 4 steps 1.44-1.50x (seed 0)
#: where consistency at its geometric timesteps scored 0.75-1.37x (3 seeds).
MATCHING_MAX_SAMPLER_STEPS = 2
#: The same for a student outside ``CONV_FAMILIES`` (a DiT): at 4 steps, six sampling seeds, six
#: DiT students, matching scored 1.04-1.60x the teacher's mean where consistency scored 1.81-2.03x
#: (three of them; docs/few-step.md).
MATCHING_MAX_SAMPLER_STEPS_NON_CONV = 4


def fewstep_objective(sampler_steps: int, family: str = "unet") -> Setting:
    """How a K-step student of a ``family`` DKDM student is trained where --fewstep-objective is not
    given (docs/few-step.md, digits)."""
    if family not in CONV_FAMILIES and sampler_steps <= MATCHING_MAX_SAMPLER_STEPS_NON_CONV:
        steps = f"{sampler_steps} step{'s' if sampler_steps > 1 else ''}"
        return Setting("matching", f"{steps} of a {family} student: on digits DiTs' distribution "
                                   f"matching generators scored 1.04-1.60x the teacher's 100-step digits-FID at 4 "
                                   f"steps (6 DiT students), their consistency students 1.81-2.03x (3; six sampling "
                                   f"seeds each)")
    if sampler_steps == 1:
        return Setting("matching", "one step: on digits distribution matching scored 1.24-1.81x the teacher's "
                                   "100-step digits-FID on two teachers, consistency 1.53-3.85x, with a quarter of its "
                                   "steps")
    if sampler_steps <= MATCHING_MAX_SAMPLER_STEPS:
        return Setting("matching", f"{sampler_steps} steps: on digits distribution matching (the last step trained) "
                                   f"scored 1.16-1.51x the teacher's 100-step digits-FID on two teachers, consistency "
                                   f"1.24-1.83x, with a quarter of its steps")
    return Setting("consistency", f"{sampler_steps} steps: on digits consistency scored 0.75-1.37x the teacher's "
                                  f"100-step digits-FID at 4 steps (3 seeds of two teachers), distribution matching "
                                  f"1.44-1.50x (seed 0)")


#: ``--fewstep-objective matching`` (docs/few-step.md): 0.7 of distill's budget, a tenth of its lr, a
#: 100-step warm-up. Digits seed 0, one step: digits-FID 16.1 / 12.3 at 300 / 600 steps (lr 1e-4); two
#: steps at six sampling seeds: 600 steps missed 1.5x on two of six students, 900 and 1,200 met it;
#: 0.7 is the most that keeps both stages within 2x distill's wall on a 2-core CPU (1.9x at 840).
MATCHING_STEPS_FACTOR, MATCHING_LR_FACTOR, MATCHING_WARMUP = 0.7, 0.1, 100
#: The same for a two-step generator from a student outside ``CONV_FAMILIES``: a fifth of distill's lr
#: (its family's, already up to 3x a UNet's). DiT two-step generators, seeds 0 / 1 / 2 at six sampling
#: seeds: 1.70 / 1.54 / 1.61x the teacher at a tenth, 1.46 / 1.45 / 1.51x at a fifth, (seeds 1 / 2)
#: 1.61 / 1.91x at two fifths. At one and four steps a fifth lost (one: 2.04x against 1.67x, seed 0;
#: four: 1.52 / 1.32 / 1.34x against 1.04 / 1.08 / 1.35x), so they keep a tenth (docs/few-step.md).
MATCHING_LR_FACTOR_NON_CONV_TWO_STEPS = 0.2


#: Where matching's fake score starts (``--fake-from``): a copy of the teacher for a K-step generator
#: of a student outside ``CONV_FAMILIES`` with K above ``MATCHING_MAX_SAMPLER_STEPS`` (docs/few-step.md,
#: "The fake score from the teacher": DiT four-step generators 1.24-1.34x the teacher, mean 1.27x, sd
#: 0.04x, against 1.08-1.60x, mean 1.37x, sd 0.19x, with the student's copy; five seeds; at 1.3-1.4x
#: the stage's CPU), else a copy of the DKDM student (at two steps level on two seeds, at one worse on
#: one of two: 1.97x against 1.67x).
def fake_score_from(family: str, sampler_steps: int) -> Setting:
    """What distribution matching's fake score starts as a copy of where --fake-from is not given."""
    if family not in CONV_FAMILIES and sampler_steps > MATCHING_MAX_SAMPLER_STEPS:
        return Setting("teacher", f"{sampler_steps} steps of a {family} student: on digits DiTs' four-step generators "
                                  f"scored 1.24-1.34x the teacher's 100-step digits-FID (mean 1.27x) with the "
                                  f"teacher's copy, 1.08-1.60x (mean 1.37x) with the student's (five seeds): its "
                                  f"errors cancel the teacher's")
    return Setting("student", "the DKDM student's copy: the teacher's costs more, and for DiTs it was level at "
                              "two steps and worse at one (docs/few-step.md)")


def matching_lr(family: str, sampler_steps: int) -> tuple[float, str]:
    """A distribution-matching generator's share of distill's learning rate, and its reason."""
    if family not in CONV_FAMILIES and sampler_steps == 2:
        return MATCHING_LR_FACTOR_NON_CONV_TWO_STEPS, ("a fifth of distill's rule ({}) for two steps outside the "
                                                       "convolutional families: DiT two-step generators scored "
                                                       "1.45-1.51x the teacher at a fifth, 1.54-1.70x at a tenth "
                                                       "(3 seeds; docs/few-step.md)")
    return MATCHING_LR_FACTOR, "a tenth of distill's rule ({}): each step moves whole samples"


def run_budget(num_steps: int, sample_shape, batch: int, family: str = "unet", objective: str = "dkdm") -> int:
    """A run's fixed step budget (also --steps auto's yardstick): distill's ``step_budget``, times
    ``FEWSTEP_STEPS_FACTOR`` for a consistency few-step run (of any number of sampler steps) or
    ``MATCHING_STEPS_FACTOR`` for matching."""
    budget = step_budget(num_steps, math.prod(int(d) for d in sample_shape), batch, family)
    if objective == "dkdm":
        return budget
    factor = MATCHING_STEPS_FACTOR if objective == "matching" else FEWSTEP_STEPS_FACTOR
    return max(1, int(factor * budget))


def fewstep_defaults(student_params: int, sample_shape, num_steps: int, given: dict | None = None,
                     family: str = "unet", objective: str = "consistency",
                     sampler_steps: int = 4) -> dict[str, Setting]:
    """``distill_defaults`` for a few-step run of ``sampler_steps`` steps: for consistency distill's step
    budget and a fifth of the learning rate; for distribution matching 0.7 of the budget, a tenth of the
    lr (a fifth for two steps outside CONV_FAMILIES); the rest as distill's."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    out = distill_defaults(student_params, sample_shape, num_steps, given, family)
    batch = int(given.get("batch", PAPER_BATCH))
    budget = run_budget(num_steps, sample_shape, batch, family, objective)
    steps = budget if given.get("steps", "auto") == "auto" else int(given["steps"])
    if objective == "matching":
        return _matching_defaults(out, budget, steps, *matching_lr(family, sampler_steps))
    if "steps" in out:
        out["steps"] = Setting(budget, f"distill's budget ({out['steps'].why}): its samples take the geometric "
                                       f"timesteps")
    if "warmup" in out:
        out["warmup"] = Setting(warmup_steps(steps), f"a 50th of {steps:,} steps, in [200, 5000]")
    if "lr" in out:
        out["lr"] = Setting(FEWSTEP_LR_FACTOR * out["lr"].value,
                            f"a fifth of distill's rule ({out['lr'].why}): the student's own outputs are its targets")
    return out


def _matching_defaults(out: dict[str, Setting], budget: int, steps: int, lr_share: float,
                       lr_why: str) -> dict[str, Setting]:
    """distill's rules scaled for a distribution-matching generator (``MATCHING_*``) of ``budget``
    steps by the rule, ``steps`` to train (given, or the budget), ``lr_share`` of distill's rate
    (``matching_lr``); no pool, so no rho."""
    out.pop("rho", None)
    if "steps" in out:
        out["steps"] = Setting(budget, f"0.7 of distill's budget ({out['steps'].why}): the generator starts as a "
                                       f"denoiser and the teacher judges whole samples")
    if "warmup" in out:
        out["warmup"] = Setting(min(MATCHING_WARMUP, steps), "the fake score follows the generator's first moves")
    if "lr" in out:
        out["lr"] = Setting(lr_share * out["lr"].value, lr_why.format(out["lr"].why))
    return out
