"""Sample a model and score it against its reference data; write a run's report.

One place decides which metrics a reference gets (sliced W2 for 2-D data, digits-FID /
precision / recall / class histogram for digits, FID / IS / precision / recall in Inception space
for an RGB reference the user supplies), so ``dkdm evaluate``, the end of ``dkdm train`` /
``dkdm distill`` and library code report the same numbers: ``reference_for`` names the
reference, ``score`` scores samples against it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .errors import DkdmError

#: Samples and sampling steps used by default per data set (fixed so numbers compare; for digits
#: as many samples as the train split, whose own score is the floor in the report).
METRIC_SIZES = {"toy2d": {"num": 4000, "steps": None}, "digits": {"num": 1437, "steps": 100}}


#: Samples and sampling steps of a report's data-free comparison when no data set is known.
DATA_FREE_SIZE = {"num": 1000, "steps": 100}
PICTURE_PAIRS = 64  # teacher / student image pairs in samples.png


def eval_settings(reference, num: int | None, steps: int | None) -> tuple[int, int | None]:
    """Sample count and sampling steps (None: all) of an evaluation: given, else the reference's
    defaults (a built-in data set's, an RGB reference's ``default_num``, the data-free ones)."""
    if reference is None:
        d = DATA_FREE_SIZE
    elif isinstance(reference, str):
        d = METRIC_SIZES.get(reference, {"num": 1000, "steps": None})
    else:
        d = {"num": default_num(reference), "steps": None}
    return num or d["num"], steps if steps is not None else d["steps"]


#: Sample-steps a report may always spend, however short the run (a few seconds to a minute of a
#: small model on a 2-core CPU); and the smallest report a sized one shrinks to.
REPORT_FLOOR = 10_000
REPORT_MIN_NUM, REPORT_MIN_STEPS, REPORT_STEPS = 100, 10, 25


class ReportSize(NamedTuple):
    """What a run's report draws: ``num`` samples of ``steps`` steps (None: all) from each of the
    student and the teacher, about ``cost`` sample-steps in all; ``sized``: shrunk to fit the run."""

    num: int
    steps: int | None
    cost: int
    sized: bool

    def describe(self, num_steps: int) -> str:
        return (f"report: {self.num:,} samples x {self.steps or num_steps} steps of the student and the teacher, "
                f"~{self.cost:,} sample-steps"
                + (" (sized to the run's own cost; --eval-num / --eval-steps set it)" if self.sized else "")
                + "; the teacher's samples and statistics are cached across runs")


def report_size(reference, num: int | None, steps: int | None, num_steps: int, sample_shape,
                budget: int | None) -> ReportSize:
    """A distillation report's sample count and steps (student and teacher each draw them, and the
    picture pairs of samples.png): given, or the reference's defaults; where neither is
    given and those would cost more sample-steps than ``budget`` (the run's own network passes
    per sample: the teacher's and the student's updates) or ``REPORT_FLOOR``, fewer steps (``REPORT_STEPS``), then fewer samples (at
    least ``REPORT_MIN_NUM``), then fewer steps again (at least ``REPORT_MIN_STEPS``)."""
    n, s = eval_settings(reference, num, steps)
    models = 2  # the student and the teacher
    pictures = PICTURE_PAIRS if len(sample_shape) == 3 else 1000 if tuple(sample_shape) == (2,) else 0

    def cost(n_, s_):
        return models * (n_ + pictures) * min(s_ or num_steps, num_steps)

    limit = max(budget or 0, REPORT_FLOOR)
    if budget is None or num is not None or steps is not None or cost(n, s) <= limit:
        return ReportSize(n, s, cost(n, s), False)
    s = min(s or num_steps, REPORT_STEPS, num_steps)
    n = max(REPORT_MIN_NUM, min(n, limit // (models * s) - pictures))
    if cost(n, s) > limit:
        s = max(min(REPORT_MIN_STEPS, num_steps), min(s, limit // (models * (n + pictures))))
    s = max(s, 2) if num_steps >= 2 else s
    return ReportSize(n, s, cost(n, s), True)


class Drawn(NamedTuple):
    """Samples and the class labels they were drawn for (None: an unconditional model)."""

    samples: torch.Tensor
    labels: torch.Tensor | None


def _toy2d(samples, dataset, labels):
    from .metrics.toy import sliced_w2

    return {"sliced_w2": sliced_w2(samples, dataset)}


def _digits(samples, dataset, labels):
    from .metrics.digits import digits_metrics

    return digits_metrics(samples, labels=labels)


class Metric(NamedTuple):
    """How samples of one built-in reference are scored, and the one number that heads them."""

    score: Callable  # (samples, dataset, labels) -> dict of metrics
    headline: str


#: Every built-in reference's metrics: adding one is adding a row here. RGB references the user
#: supplies are scored in Inception space (metrics/inception.py), headed by ``fid``.
METRICS = {"toy2d": Metric(_toy2d, "sliced_w2"), "digits": Metric(_digits, "digits_fid")}
HEADLINES = (*(m.headline for m in METRICS.values()), "fid")
#: The columns of the report's table, in order (those no row has are left out).
SUMMARY_KEYS = ("digits_fid", "fid", "sfid", "inception_score", "precision", "recall", "density", "coverage",
                "class_tv", "label_accuracy",
                "sliced_w2", "teacher_fd", "heldout_mse")


def reference_for(reference, inception_weights=None, device="cpu", extractor=None):
    """What ``score`` compares samples with: a built-in data set's name (``toy2d``, ``digits``) as is,
    or an RGB reference (an ADM reference batch or statistics ``.npz``, or a folder of images) with
    the Inception network of ``inception_weights`` (or any ``extractor``, see metrics/references.py)."""
    from .data import BUILTIN
    from .metrics.inception import InceptionMetric, load_extractor
    from .metrics.references import read_reference

    if isinstance(reference, InceptionMetric) or (reference in BUILTIN and extractor is None and not inception_weights):
        return reference
    if reference in BUILTIN:
        raise DkdmError(f"{reference} is a built-in data set with its own metrics; Inception metrics need an RGB "
                        f"reference: an ADM reference batch (.npz), a folder of images or statistics (.npz)")
    ref = read_reference(reference)
    if extractor is None:
        if not inception_weights:
            raise DkdmError(f"the RGB reference {reference} is scored in Inception space: pass --inception-weights "
                            f"(the local pt_inception weights)")
        extractor = load_extractor(inception_weights, device)
    return InceptionMetric(ref, extractor)


def _name(reference) -> str | dict:
    return reference if isinstance(reference, str) else reference.describe()


def score(samples: torch.Tensor, reference, labels: torch.Tensor | None = None) -> dict:
    """Metrics of ``samples`` (images in [-1, 1], latent models' decoded) against ``reference``:
    a built-in data set's name or an RGB reference from ``reference_for``."""
    from .data import builtin_dataset
    from .metrics.inception import InceptionMetric

    if isinstance(reference, InceptionMetric):
        return reference(samples)
    dataset = builtin_dataset(reference)
    if tuple(samples.shape[1:]) != tuple(dataset.sample_shape):
        raise DkdmError(f"samples have shape {list(samples.shape[1:])} but {reference} has {list(dataset.sample_shape)}")
    if reference not in METRICS:
        raise DkdmError(f"no metrics defined for {reference!r}")
    return METRICS[reference].score(samples, dataset, labels)


def check_reference(reference: str, sample_shape=None) -> None:
    """DkdmError unless ``reference`` names a data set with metrics (of ``sample_shape``, when given)."""
    from .data import builtin_dataset

    dataset = builtin_dataset(reference)
    if sample_shape is not None and tuple(sample_shape) != tuple(dataset.sample_shape):
        raise DkdmError(f"--reference {reference} holds {list(dataset.sample_shape)} samples but the model draws "
                        f"{list(sample_shape)}")


def data_floor(reference: str) -> dict | None:
    """The real train split scored like a model (the best a model of the data can expect)."""
    if reference != "digits":
        return None
    from .data import Digits

    return score(Digits("train").images, "digits")


def draw(model, num: int, steps: int | None, seed: int, progress: bool = True, batch_size: int = 1024,
         guidance: float = 1.0, return_labels: bool = False, desc: str = "sample"):
    """``num`` samples from the seed's noise: two models of the same shape (and classes) drawn
    with the same seed, steps and batch size start from the same noise and draw the same labels.
    With ``return_labels``, a ``Drawn`` (samples and their labels)."""
    from .progress import progress_bar

    model.check_sampling_steps(steps)
    T = model.sampler_steps or model.schedule.num_steps
    if num < 2:
        raise DkdmError(f"--num must be at least 2, got {num}")
    g = torch.Generator(device=next(model.parameters(), torch.empty(0)).device).manual_seed(seed)
    with progress_bar(num * (steps or T), desc, unit="sample-step", unit_scale=True, disable=not progress) as bar:
        out = model.sample(num, steps, g, batch_size=batch_size, progress=bar, guidance=guidance,
                           return_labels=return_labels)
    return Drawn(*out) if return_labels else out


def teacher_statistics(teacher, num: int, steps: int | None, seed: int, guidance: float = 1.0,
                       progress: bool = True, cache: bool = True, drawn: Drawn | None = None
                       ) -> dict[str, torch.Tensor]:
    """Mean and covariance of the teacher's samples in its own features (metrics/teacher_fd.py),
    with the labels they were drawn for: the reference of the data-free sample score. Cached per
    weights and settings, as the teacher's metrics are; samples the teacher has just drawn with
    these settings (``drawn``, with their labels) are not drawn again."""
    from .metrics import cached
    from .metrics.features import mean_cov
    from .metrics.teacher_fd import TeacherFeatures, weights_fingerprint

    features = TeacherFeatures(teacher)
    settings = {"num": num, "steps": steps or teacher.schedule.num_steps, "seed": seed, "guidance": guidance,
                "schedule": teacher.schedule.num_steps, "dtype": str(teacher.inference_dtype), **features.describe()}
    key = _settings_key(settings)

    def compute():
        samples, labels = drawn if drawn is not None else draw(teacher, num, steps, seed, progress, guidance=guidance,
                                                               return_labels=True, desc="teacher samples")
        mean, cov = mean_cov(features(samples, labels))
        return {"mean": mean, "cov": cov, **({"labels": labels.cpu()} if labels is not None else {})}

    return cached(f"teacherfd-{weights_fingerprint(teacher.net)}-{key}.safetensors" if cache else None, compute)


def data_free_score(teacher, samples: torch.Tensor, stats: dict[str, torch.Tensor]) -> float:
    """Fréchet distance between ``samples`` (a student's, from the teacher reference's noise) and
    the teacher's, in the teacher's features: 0 for a student that samples like its teacher."""
    from .metrics.features import frechet_distance, mean_cov
    from .metrics.teacher_fd import TeacherFeatures

    feats = TeacherFeatures(teacher)(samples, stats.get("labels"))
    return frechet_distance(stats["mean"], stats["cov"], *mean_cov(feats))


def _settings_key(settings: dict) -> str:
    """A short key for a cache entry drawn with ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _weights_key(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("unet/*.safetensors")]):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def default_num(reference) -> int:
    """Samples scored by default: fixed per built-in data set; for an RGB reference as many as its
    images, at most the 50,000 of the ADM evaluator (50,000 against statistics alone)."""
    if isinstance(reference, str):
        return METRIC_SIZES.get(reference, {"num": 1000})["num"]
    return min(len(reference.reference), 50000) or 50000


def evaluate_model(model, model_dir, reference, num=None, steps=None, seed: int = 0,
                   progress: bool = True, cache: bool = False, desc: str = "sample") -> tuple[dict, Drawn | None]:
    """Metrics of ``model``'s samples against ``reference`` (see ``reference_for``), and what was
    drawn for them (None when the result came from the cache, kept per weights + settings)."""
    num, steps = eval_settings(reference, num, steps or model.sampler_steps)
    settings = {"reference": _name(reference), "num_samples": num,
                "sampling_steps": steps or model.schedule.num_steps, "seed": seed}
    path = None
    if cache:
        from .metrics import cache_dir

        from .metrics.teacher_fd import weights_fingerprint

        key = _settings_key(settings)  # a model given as an object has no directory: its weights name it
        weights = _weights_key(Path(model_dir)) if model_dir is not None else weights_fingerprint(model.net)
        path = cache_dir() / f"eval-{weights}-{key}.json"
        if path.exists():
            try:
                return json.loads(path.read_text()), None
            except (OSError, json.JSONDecodeError):
                pass
    drawn = draw(model, num, steps, seed, progress, return_labels=True, desc=desc)
    if isinstance(reference, str):  # built-in references are scored on the CPU, wherever the model drew
        samples, labels = drawn.samples.cpu(), None if drawn.labels is None else drawn.labels.cpu()
    else:  # RGB metrics see images
        samples, labels = model.decode(drawn.samples), drawn.labels
    result = {**settings, **score(samples, reference, labels)}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
        except OSError:
            pass
    return result, Drawn(samples, labels)


def summary_table(rows: dict[str, dict]) -> str:
    """A plain-text table of the headline metrics, one row per model (and one comparing student and teacher)."""
    keys = [k for k in SUMMARY_KEYS if any(k in r for r in rows.values())]
    lines = ["| model | " + " | ".join(keys) + (" | missing classes |" if "digits_fid" in keys else " |")]
    lines.append("|---" * (len(keys) + 1 + ("digits_fid" in keys)) + "|")
    for name, r in rows.items():
        cells = [f"{r[k]:.4f}" if k in r else "-" for k in keys]
        if "digits_fid" in keys:
            cells.append(str(r.get("missing_classes", [])) if "missing_classes" in r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out, student, reference, teacher=None, teacher_dir=None, seed: int = 0,
                 progress: bool = True, num: int | None = None, steps: int | None = None, guidance: float = 1.0,
                 heldout: dict | None = None) -> dict:
    """metrics.json and samples.png for a finished run; returns the summary rows.

    With a ``reference`` data set: its metrics for the model, the teacher and the real train split.
    With a ``teacher`` (any teacher, data set known or not): the data-free comparison, i.e. the
    Fréchet distance in the teacher's features between student and teacher samples from the same
    noise, and the held-out error the run measured last; samples.png then shows teacher and student
    side by side, drawn from the same noise.
    """
    out = Path(out)
    rows, samples, teacher_drawn = {}, None, None
    num, steps = eval_settings(reference, num, steps)
    if steps is not None:
        steps = min(steps, student.schedule.num_steps)
    student_steps = student.sampler_steps or steps  # a few-step student draws its K steps, the teacher its own
    if reference:
        if teacher is not None:
            rows["teacher"], teacher_drawn = evaluate_model(teacher, teacher_dir, reference, num, steps, seed, progress,
                                                            cache=True, desc="teacher samples")
        rows["student" if teacher is not None else "model"], drawn = evaluate_model(
            student, out, reference, num, student_steps, seed, progress, desc="student samples" if teacher else "samples")
        samples = drawn.samples
        floor = data_floor(reference)
        if floor is not None:
            rows["real train split"] = floor
    if teacher is not None:
        if samples is None:
            samples = draw(student, num, student_steps, seed, progress, desc="student samples")
        stats = teacher_statistics(teacher, num, steps, seed, guidance, progress,
                                   drawn=teacher_drawn if guidance == 1.0 else None)
        rows["student vs teacher"] = {"teacher_fd": data_free_score(teacher, samples, stats), "num_samples": num,
                                      "sampling_steps": student_steps or student.schedule.num_steps, "seed": seed,
                                      **(heldout or {})}
        _picture_pair(out, student, teacher, steps, student_steps, seed, guidance, progress)
    elif samples is not None and samples.dim() == 4:
        from .images import save_grid

        save_grid(samples[:100], out / "samples.png", nrow=10)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    return rows


def _picture_pair(out: Path, student, teacher, steps, student_steps, seed: int, guidance: float, progress: bool) -> None:
    """samples.png: teacher and student samples from the same noise (images side by side, 2-D points
    as two scatter plots); other data gets no picture."""
    shape = student.sample_shape
    if len(shape) == 1 and shape[0] != 2:
        return
    n = PICTURE_PAIRS if len(shape) == 3 else 1000
    pair = [teacher.decode(_teacher_pictures(teacher, n, steps, seed, guidance, progress)),
            student.decode(draw(student, n, student_steps, seed, progress, desc="samples.png: student"))]
    if len(shape) == 3:
        from .images import save_side_by_side

        save_side_by_side(pair, ["teacher", "student"], out / "samples.png")
    else:
        from .plots import scatter_pair

        scatter_pair(pair, ["teacher", "student"], out / "samples.png")


def _teacher_pictures(teacher, n: int, steps, seed: int, guidance: float, progress: bool) -> torch.Tensor:
    """The teacher's side of samples.png, kept in the cache per weights and settings: every run of
    the same teacher draws the same ones."""
    from .metrics import cached
    from .metrics.teacher_fd import weights_fingerprint

    settings = {"n": n, "steps": steps or teacher.schedule.num_steps, "seed": seed, "guidance": guidance,
                "schedule": teacher.schedule.num_steps, "dtype": str(teacher.inference_dtype)}
    key = _settings_key(settings)
    device = next(teacher.parameters(), torch.empty(0)).device
    samples = cached(f"pictures-{weights_fingerprint(teacher.net)}-{key}.safetensors",
                     lambda: {"samples": draw(teacher, n, steps, seed, progress, guidance=guidance,
                                              desc="samples.png: teacher").cpu()})["samples"]
    return samples.to(device)
