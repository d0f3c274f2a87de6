"""The command line's flags: every command's parser, each flag's help with the default its run uses
(from the settings tables), and a misspelled flag answered with the closest ones. ``cli.py`` parses
with it and calls the library."""

from __future__ import annotations

import argparse
import sys

from .choices import CONVERT_FORMATS


def _did_you_mean(word: str, choices, prefix: str = "", n: int = 2) -> str:
    """'did you mean X or Y?' for the choices closest to a mistyped ``word`` ('' when none is close)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f"did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: a usage block of sixty flags would bury the line that matters."""

    def error(self, message):
        import re

        wrong = re.match(r"argument command: invalid choice: '([^']*)'", message)
        commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
        hint = _did_you_mean(wrong.group(1), commands, n=1) if wrong else ""
        listed = "every flag" if " " in self.prog else "the commands"
        self.exit(2, f"{self.prog}: error: {message} ({hint + ' ' if hint else ''}`{self.prog} --help` lists {listed})\n")


TEACHER_HELP = ("the teacher: builtin:digits (the bundled one); a dkdm model directory; a diffusers pipeline directory "
                "or Hub id (DDPMPipeline, DDIMPipeline, LDMPipeline, DiTPipeline); or an ADM / guided-diffusion "
                "checkpoint (.pt loaded weights-only, or .safetensors) with --teacher-config")


def _common(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same result on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not training:
        return
    p.add_argument("--out", help="run directory to create (it becomes the model directory; default: "
                                 "dkdm-runs/COMMAND-DATE-TIME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint with the settings it saved (run.json): no "
                        "other flag is needed, and only --steps, --max-steps, --patience and how it logs, checkpoints "
                        "and reports may change")
    p.add_argument("--steps", help="training iterations, or auto (distill, fewstep): stop when the held-out error and the "
                        "data-free score (fewstep: the data-free score of its K-step samples) stop improving (see "
                        "--patience, --max-steps)")
    p.add_argument("--batch", help="training batch size B")
    p.add_argument("--lr", help="AdamW learning rate")
    p.add_argument("--weight-decay", help="AdamW weight decay")
    p.add_argument("--ema", help="EMA decay of the saved weights")
    p.add_argument("--grad-clip", help="gradient-norm clip (0: off)")
    p.add_argument("--warmup", help="learning-rate warm-up steps")
    p.add_argument("--lr-decay", help="after the warm-up: constant, or cosine to 0 at the last step (in 100 constant stages)")
    p.add_argument("--mixed-precision", help="autocast the student's update (fp16 needs a CUDA device)")
    p.add_argument("--log-every", help="write a log.jsonl line every N steps")
    p.add_argument("--ckpt-every", help="checkpoint every K steps")
    p.add_argument("--keep-checkpoints", help="checkpoints kept (the oldest are deleted)")
    _objective_and_speed_flags(p)
    _report_and_watch_flags(p)


def _objective_and_speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vlb-weight", help="lambda on L*vlb (default 1: the authors' code)")
    p.add_argument("--simple-weight", help="weight of L*simple (default 1; 0 with --vlb-mean-grad: the "
                                                        "VLB term alone, an ablation)")
    p.add_argument("--vlb-mean-grad", action="store_true", default=None,
                   help="let L*vlb's gradient reach the student's mean (the method holds it with a stop-gradient; "
                        "an ablation)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the networks by regions (each repeated block in place; the student, in distill "
                        "also the teacher); the first step is slow while it compiles, and says how long; compiled "
                        "kernels are cached under $DKDM_CACHE/inductor for the next run of the same shapes")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last weights for convolutional networks (PyTorch advises it for convolutions on GPUs in "
                        "reduced precision; measure with bench/speed.py)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay each student update (in distill also the pool's teacher step) as a CUDA graph: one "
                        "launch instead of hundreds (needs a CUDA device; not with --compile, fp16 or several processes)")


def _report_and_watch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-report", action="store_true", default=None,
                   help="skip the final samples / metrics report and training.png (the model card is written)")
    p.add_argument("--eval-num", help="samples for the final report (default: per data set)")
    p.add_argument("--eval-steps", help="sampling steps for the final report (default: per data set)")
    p.add_argument("--eval-every", help="score the EMA model every N steps (held-out error, data-free score, the run's metric): "
                        "log.jsonl and training.png (default: off; --steps auto: a 20th of the fixed default budget)")
    p.add_argument("--monitor-num", help="samples drawn at each --eval-every evaluation (default 1000)")
    p.add_argument("--monitor-steps", help="sampling steps of each --eval-every evaluation (default 25; "
                                                      "a few-step student samples in its K, the teacher in these)")
    p.add_argument("--report-to", metavar="TRACKERS",
                   help="experiment trackers: tensorboard, wandb, mlflow (several separated by commas), all or none; "
                        "they get every log record, the --eval-every scores and sample grids (files in RUN/tracking)")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload the finished run's model directory and its model card to this Hugging Face Hub repo "
                        "(as `dkdm push`)")
    p.add_argument("--patience", help="--steps auto: evaluations without a 1%% improvement of both scores before stopping (default 4)")
    p.add_argument("--max-steps", help="--steps auto: the most steps to train (default: 4x the fixed default budget)")


def _kinds_from_settings(p: argparse.ArgumentParser, cls) -> None:
    """Each flag of a run's setting parses as the setting's kind, within its choices, as ``cls``
    (settings.py) defines them: one definition, no copied lists."""
    from dataclasses import fields

    from .settings import STEPS

    settings = {f.name: f.metadata for f in fields(cls)}
    for a in p._actions:
        m = settings.get(a.dest)
        if m is None or a.nargs == 0:  # not a run setting, or an on/off flag
            continue
        a.type = _steps if m["kind"] is STEPS else m["kind"] if m["kind"] in (int, float) else None
        a.choices = m["choices"]


def _show_defaults(p: argparse.ArgumentParser, table: dict, ruled=(), per_data: dict | None = None) -> None:
    """Append each flag's default to its help, from the settings table its run merges: argparse's own
    defaults stay None, so that a run tells a flag given from one left out."""
    for a in p._actions:
        if not a.option_strings or a.dest in ("help", "version") or "default" in (a.help or ""):
            continue
        per = {name: d[a.dest] for name, d in (per_data or {}).items() if a.dest in d}
        if a.dest in ruled:
            text = "from the student and the problem, printed when the run starts"
        elif per:
            text = "; ".join(f"{name}: {v}" for name, v in per.items()) + f"; other data: {table.get(a.dest)}"
        elif table.get(a.dest) is not None and table[a.dest] is not False:
            text = str(table[a.dest])
        elif a.default is not None and a.default is not False:
            text = str(a.default)
        else:
            text = "off" if a.nargs == 0 else "none"
        a.help = f"{a.help or ''} (default: {text})".strip()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = sys.modules[__package__].__version__  # the package is loaded before any of its modules

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"dkdm {__version__} (torch {v('torch')}, diffusers {v('diffusers')}, accelerate {v('accelerate')})"


def _teacher_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--teacher and an ADM checkpoint's --teacher-config (distill and fewstep); ``default``: said in
    the help where the settings table does not hold it."""
    p.add_argument("--teacher", help=TEACHER_HELP + (f" (default: {default})" if default else ""))
    p.add_argument("--teacher-config", help="guided-diffusion flags (YAML/JSON) of an ADM checkpoint --teacher")


def _pool_flags(p: argparse.ArgumentParser) -> None:
    """The flags distill and fewstep share: the teacher's precision, the pool, held-out states and the report's reference."""
    p.add_argument("--teacher-dtype", help="run the teacher's network in reduced precision (faster on GPUs; targets change slightly)")
    p.add_argument("--guidance", help="classifier-free guidance scale of a class-conditional teacher's targets (1: none)")
    p.add_argument("--pool", help="the pool of partially denoised samples (dynamic: the paper's dynamic iterative distillation)")
    p.add_argument("--rho", help="dynamic pool size in batches per diffusion step (paper: 0.4)")
    p.add_argument("--pool-dtype", help="dtype the pool keeps its samples in (16-bit halves its memory)")
    p.add_argument("--prep-batch", help="teacher batch size for pool preparation (default 1024 on a CPU, 8192 on a GPU)")
    p.add_argument("--prep", help="pool preparation: exact (each entry its own teacher chain, N*T/2 steps), sampled (a K-step "
                         "x0 per entry, noised by q: N*K), shared (each K-step x0 noised by q to one stop in each of "
                         "K-1 bands: about N*K/(K-1)), or auto: exact where K >= T/2, shared where sampled "
                         "preparation would cost more teacher steps than the training, else sampled")
    p.add_argument("--prep-steps", help="K, the teacher sampling steps of --prep sampled / shared (default 10, at most T)")
    p.add_argument("--prep-ckpt-every", metavar="SECONDS",
                    help="checkpoint the pool preparation every SECONDS (default 300; 0: after every --prep-batch "
                         "chunk), so that --resume continues an interrupted preparation")
    p.add_argument("--heldout", help="pool states held out to score the student on with --eval-every (default 512; 0: none)")
    p.add_argument("--reference", help="data set the teacher learned (a built-in name), for the report's and "
                                        "--eval-every's data-set metrics (default: the one the teacher records); with "
                                        "--inception-weights an ADM reference batch or statistics (.npz) or a folder "
                                        "of images")
    p.add_argument("--dry-run", action="store_true", default=None,
                    help="load the teacher, build the student, check the settings and memory, print the plan and its "
                         "cost, and stop before the pool is allocated (nothing is written)")
    p.add_argument("--inception-weights", help="local Inception weights (torch-fidelity's pt_inception file): "
                                                "--eval-every and the report score FID, IS, precision and recall "
                                                "against --reference")


def build_parser() -> argparse.ArgumentParser:
    from .settings import (COMMON_DEFAULTS, DATA_DEFAULTS, DISTILL_DEFAULTS, DISTILL_RULED, FEWSTEP_DEFAULTS,
                           TRAIN_DEFAULTS, DistillSettings, FewstepSettings, TrainSettings)

    ap = _Parser(prog="dkdm", description="Data-free knowledge distillation for diffusion models.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)

    tr, di, fs = _train_parser(sub), _distill_parser(sub), _fewstep_parser(sub)
    tools = _tool_parsers(sub)
    for p, cls in ((tr, TrainSettings), (di, DistillSettings), (fs, FewstepSettings)):
        _kinds_from_settings(p, cls)
    _show_defaults(tr, {**COMMON_DEFAULTS, **TRAIN_DEFAULTS}, per_data=DATA_DEFAULTS)
    _show_defaults(di, {**COMMON_DEFAULTS, **DISTILL_DEFAULTS}, ruled=DISTILL_RULED)
    _show_defaults(fs, {**COMMON_DEFAULTS, **DISTILL_DEFAULTS, **FEWSTEP_DEFAULTS}, ruled=DISTILL_RULED)
    for p in tools:
        _show_defaults(p, {"seed": 0})
    return ap


def _train_parser(sub) -> argparse.ArgumentParser:
    tr = sub.add_parser("train", help="ordinary data-based training (teachers and baselines)")
    _common(tr, True)
    tr.add_argument("--data", help="built-in data set (toy2d, digits) or a sample set written by `dkdm synth`")
    tr.add_argument("--real-fraction", help="data-limited baseline: keep this percentage of --data, fill up with --synthetic samples")
    tr.add_argument("--synthetic", help="sample set (from `dkdm synth`) that fills up a --real-fraction set")
    tr.add_argument("--model", help="architecture spec, e.g. mlp:width=128,depth=3")
    tr.add_argument("--schedule", help="noise schedule")
    tr.add_argument("--diffusion-steps", help="T, the number of diffusion steps")
    tr.add_argument("--variance", help="reverse-process variance (learned_range trains it with L*vlb)")
    tr.add_argument("--prediction", help="what the network predicts")
    return tr


def _distillation_parser(sub, name: str, help: str, description: str, student: str,
                         teacher_default: str | None = None) -> argparse.ArgumentParser:
    """distill and fewstep: the training flags, the teacher's, the student's and the pool's."""
    p = sub.add_parser(name, help=help, description=description)
    _common(p, True)
    _teacher_flags(p, teacher_default)
    p.add_argument("--student", help=student)
    return p


def _distill_parser(sub) -> argparse.ArgumentParser:
    di = _distillation_parser(
        sub, "distill", "data-free distillation of a teacher into a student (DKDM)",
        "Data-free distillation (DKDM). --batch, --steps, --lr, --warmup, --ema and --grad-clip not given (by flag or "
        "--config) follow from the student's size and the problem (T, sample size), the same rules for every "
        "teacher; the run prints each with its reason.",
        "student architecture spec (default: the teacher's family at every width / sqrt(2), about half its parameters)")
    di.add_argument("--student-steps", help="the student's diffusion steps: an even respacing of the teacher's (default: the same)")
    di.add_argument("--variance", help="student variance (learned_range trains it with L*vlb)")
    _pool_flags(di)
    return di


def _fewstep_parser(sub) -> argparse.ArgumentParser:
    fs = _distillation_parser(
        sub, "fewstep", "make a distilled student a K-step sampler (consistency distillation, data-free)",
        "The second stage: a student of any architecture (the --out of `dkdm distill`) becomes a K-step sampler by "
        "consistency distillation on the teacher's pool or by distribution matching, reading nothing but the "
        "teacher (by default the one the student was distilled from). Saved as a diffusers DDPMPipeline with an "
        "LCMScheduler (its README shows the loop at the student's K timesteps); `dkdm sample` / `evaluate` use "
        "its K steps.",
        "the student to start from: the run or model directory of `dkdm distill` (or any model of the teacher's "
        "sample shape and steps, e.g. the teacher itself)",
        teacher_default="the teacher --student was distilled from, as it records it")
    fs.add_argument("--sampler-steps", help="K, the steps the saved student samples in (1..50; sample / evaluate --steps picks another)")
    fs.add_argument("--fewstep-objective", help="consistency distillation on the teacher's pool, or distribution matching (the student as a "
                         "generator from t*, judged by the teacher and a fake score: docs/few-step.md) (default: "
                         "matching for one step, consistency for more; printed when the run starts)")
    fs.add_argument("--fewstep-prediction", help="what the few-step student's network predicts (v: well conditioned at every step)")
    fs.add_argument("--consistency-grid", metavar="N",
                    help="the ODE's grid: consistency pairs T/N steps apart, and the timesteps K steps are taken "
                         "from (LCMScheduler's original_inference_steps; default min(50, T))")
    _pool_flags(fs)
    return fs


def _tool_parsers(sub) -> list[argparse.ArgumentParser]:
    """synth, convert, sample, push, report and evaluate: the tools around a run."""
    sy = sub.add_parser("synth", help="sample a synthetic data set from a teacher (the data-free baseline's data)")
    _common(sy, False)
    sy.add_argument("--teacher", default="builtin:digits", help=TEACHER_HELP)
    sy.add_argument("--teacher-config", help="guided-diffusion flags (YAML/JSON) of an ADM checkpoint --teacher")
    sy.add_argument("--num", type=int, help="number of samples (default: the size of the teacher's training set)")
    sy.add_argument("--steps", type=int, default=100, help="teacher sampling steps (the paper: 1000 or 100)")
    sy.add_argument("--batch", type=int, default=1024, help="samples drawn at once")
    sy.add_argument("--out", required=True, help="sample set directory to create (train on it with --data DIR)")

    co = sub.add_parser("convert", help="turn an ADM / guided-diffusion checkpoint into a dkdm model directory")
    co.add_argument("--checkpoint", required=True, help="guided-diffusion state dict (.pt loaded weights-only, or .safetensors)")
    co.add_argument("--config", required=True, help="its guided-diffusion flags, YAML or JSON")
    co.add_argument("--out", required=True, help="model directory to create")
    co.add_argument("--format", choices=CONVERT_FORMATS, default="dkdm",
                    help="dkdm: the ADM network as is; diffusers: a DDPMPipeline with an equivalent UNet2DModel")

    sa = sub.add_parser("sample", help="draw samples from a model directory")
    _common(sa, False)
    sa.add_argument("--model", required=True, help="model directory")
    sa.add_argument("--num", type=int, default=1000, help="number of samples")
    sa.add_argument("--steps", type=int, help="sampling steps (default: all diffusion steps; a few-step student: its K)")
    sa.add_argument("--batch", type=int, default=1024, help="samples drawn at once")
    sa.add_argument("--out", required=True, help="output file: .npz (arrays) or .png (image grid)")

    pu = sub.add_parser("push", help="upload a model directory and its model card to the Hugging Face Hub")
    pu.add_argument("directory", help="the model directory (a run's --out)")
    pu.add_argument("repo_id", help="the Hub repo, USER/NAME or ORG/NAME (created if it does not exist)")
    pu.add_argument("--private", action="store_true", help="create the repo private")

    rp = sub.add_parser("report", help="redraw a run's training.png from its log, and write its model card if missing")
    rp.add_argument("directory", help="the run directory")

    ev = sub.add_parser("evaluate", help="metrics of a model's samples against a reference, as JSON")
    _common(ev, False)
    ev.add_argument("--model", required=True, help="model directory")
    ev.add_argument("--reference", help="built-in data set (default: the one the model or its teacher learned); with "
                                        "--inception-weights an ADM reference batch or statistics (.npz) or a folder "
                                        "of images")
    ev.add_argument("--inception-weights", help="local Inception weights (torch-fidelity's pt_inception file): FID, IS, "
                                                "precision and recall of RGB models against --reference")
    ev.add_argument("--num", type=int, help="number of samples (default: the metric's fixed count)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: all diffusion steps; a few-step student: its K)")
    return [sy, co, sa, ev, pu, rp]


def _steps(text: str):
    """--steps: a number of iterations, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or auto, got {text!r}")
