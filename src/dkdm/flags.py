"""The command line's flags: every command's parser, and a misspelled flag answered with the closest
ones. A run's flags (train, distill, fewstep) are made from its settings' definitions (settings.py:
the name, kind, choices and default); this module holds each flag's help and appends the default
the run uses. ``cli.py`` parses with it and calls the library."""

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


#: The help of each run setting's flag, in the order --help lists them: the flag is the setting's name,
#: its kind, choices and default the setting's definition (settings.py).
RUN_HELP = {
    "out": "run directory to create (it becomes the model directory; default: dkdm-runs/COMMAND-DATE-TIME)",
    "steps": ("training iterations, or auto (distill, fewstep): stop when the held-out error and the data-free "
              "score (fewstep: the data-free score of its K-step samples) stop improving (see --patience, "
              "--max-steps)"),
    "batch": "training batch size B",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "ema": "EMA decay of the saved weights",
    "grad_clip": "gradient-norm clip (0: off)",
    "warmup": "learning-rate warm-up steps",
    "lr_decay": "after the warm-up: constant, or cosine to 0 at the last step (in 100 constant stages)",
    "mixed_precision": "autocast the student's update (fp16 needs a CUDA device)",
    "log_every": "write a log.jsonl line every N steps",
    "ckpt_every": "checkpoint every K steps",
    "keep_checkpoints": "checkpoints kept (the oldest are deleted)",
    "vlb_weight": "lambda on L*vlb (default 1: the authors' code)",
    "simple_weight": "weight of L*simple (default 1; 0 with --vlb-mean-grad: the VLB term alone, an ablation)",
    "vlb_mean_grad": ("let L*vlb's gradient reach the student's mean (the method holds it with a stop-gradient; "
                      "an ablation)"),
    "compile": ("torch.compile the networks by regions (each repeated block in place; the student, in distill "
                "also the teacher); the first step is slow while it compiles, and says how long; compiled "
                "kernels are cached under $DKDM_CACHE/inductor for the next run of the same shapes"),
    "channels_last": ("channels-last weights for convolutional networks (PyTorch advises it for convolutions on "
                      "GPUs in reduced precision; measure with bench/speed.py)"),
    "cuda_graphs": ("replay each student update (in distill also the pool's teacher step) as a CUDA graph: one "
                    "launch instead of hundreds (needs a CUDA device; not with --compile, fp16 or several "
                    "processes)"),
    "no_report": "skip the final samples / metrics report and training.png (the model card is written)",
    "eval_num": "samples for the final report (default: per data set)",
    "eval_steps": "sampling steps for the final report (default: per data set)",
    "eval_every": ("score the EMA model every N steps (held-out error, data-free score, the run's metric): "
                   "log.jsonl and training.png (default: off; --steps auto: a 20th of the fixed default budget)"),
    "monitor_num": "samples drawn at each --eval-every evaluation (default 1000)",
    "monitor_steps": ("sampling steps of each --eval-every evaluation (default 25; a few-step student samples in"
                      " its K, the teacher in these)"),
    "report_to": ("experiment trackers: tensorboard, wandb, mlflow (several separated by commas), all or none; "
                  "they get every log record, the --eval-every scores and sample grids (files in RUN/tracking)"),
    "push_to_hub": ("upload the finished run's model directory and its model card to this Hugging Face Hub repo "
                    "(as `dkdm push`)"),
    "patience": "--steps auto: evaluations without a 1%% improvement of both scores before stopping (default 4)",
    "max_steps": "--steps auto: the most steps to train (default: 4x the fixed default budget)",

}
TRAIN_HELP = {
    "data": "built-in data set (toy2d, digits) or a sample set written by `dkdm synth`",
    "real_fraction": "data-limited baseline: keep this percentage of --data, fill up with --synthetic samples",
    "synthetic": "sample set (from `dkdm synth`) that fills up a --real-fraction set",
    "model": "architecture spec, e.g. mlp:width=128,depth=3",
    "schedule": "noise schedule",
    "diffusion_steps": "T, the number of diffusion steps",
    "variance": "reverse-process variance (learned_range trains it with L*vlb)",
    "prediction": "what the network predicts",
}
DISTILL_HELP = {
    "student_steps": "the student's diffusion steps: an even respacing of the teacher's (default: the same)",
    "variance": "student variance (learned_range trains it with L*vlb)",
}
POOL_HELP = {
    "teacher_dtype": "run the teacher's network in reduced precision (faster on GPUs; targets change slightly)",
    "guidance": "classifier-free guidance scale of a class-conditional teacher's targets (1: none)",
    "pool": "the pool of partially denoised samples (dynamic: the paper's dynamic iterative distillation)",
    "rho": "dynamic pool size in batches per diffusion step (paper: 0.4)",
    "pool_dtype": "dtype the pool keeps its samples in (16-bit halves its memory)",
    "prep_batch": "teacher batch size for pool preparation (default 1024 on a CPU, 8192 on a GPU)",
    "prep": ("pool preparation: exact (each entry its own teacher chain, N*T/2 steps), sampled (a K-step x0 per "
             "entry, noised by q: N*K), shared (each K-step x0 noised by q to one stop in each of K-1 bands: "
             "about N*K/(K-1)), or auto: exact where K >= T/2, shared where sampled preparation would cost more "
             "teacher steps than the training, else sampled"),
    "prep_steps": "K, the teacher sampling steps of --prep sampled / shared (default 10, at most T)",
    "prep_ckpt_every": ("checkpoint the pool preparation every SECONDS (default 300; 0: after every --prep-batch"
                        " chunk), so that --resume continues an interrupted preparation"),
    "heldout": "pool states held out to score the student on with --eval-every (default 512; 0: none)",
    "reference": ("data set the teacher learned (a built-in name), for the report's and --eval-every's data-set "
                  "metrics (default: the one the teacher records); with --inception-weights an ADM reference "
                  "batch or statistics (.npz) or a folder of images"),
    "dry_run": ("load the teacher, build the student, check the settings and memory, print the plan and its "
                "cost, and stop before the pool is allocated (nothing is written)"),
    "inception_weights": ("local Inception weights (torch-fidelity's pt_inception file): --eval-every and the "
                          "report score FID, IS, precision and recall against --reference"),
}
FEWSTEP_HELP = {
    "sampler_steps": ("K, the steps the saved student samples in (1..50; sample / evaluate --steps picks "
                      "another)"),
    "fewstep_objective": ("consistency distillation on the teacher's pool, or distribution matching (the student"
                          " as a generator from t*, judged by the teacher and a fake score: docs/few-step.md) "
                          "(default: matching up to two steps, up to four for a student outside the convolutional families "
                          "(a DiT, a U-ViT, a network by import path), consistency above; printed when the run starts)"),
    "fewstep_prediction": "what the few-step student's network predicts (v: well conditioned at every step)",
    "consistency_grid": ("the ODE's grid: consistency pairs T/N steps apart, and the timesteps K steps are taken"
                         " from (LCMScheduler's original_inference_steps; default min(50, T))"),
    "fake_lr": ("distribution matching: the fake score's learning rate, constant (default: the generator's "
                "peak --lr)"),
    "fake_updates": ("distribution matching: the fake score's steps per generator step (DMD2's two time-scale "
                     "rule; each one more costs a fake-score forward and backward)"),
    "fake_from": ("distribution matching: the fake score starts as a copy of the DKDM student or of the teacher "
                  "(DMD's and SiD's choice: its errors then cancel the teacher's in the gradient) (default: the "
                  "teacher for three or four steps of a student outside the convolutional families, else the "
                  "student; printed when the run starts)"),
}
RESUME_HELP = ("continue the run in --out from its last checkpoint with the settings it saved (run.json): no other "
               "flag is needed, and only --steps, --max-steps, --patience and how it logs, checkpoints and reports "
               "may change")
STUDENT_HELP = {"distill": "student architecture spec (default: the teacher's family at every width / sqrt(2), about "
                           "half its parameters)",
                "fewstep": "the student to start from: the run or model directory of `dkdm distill` (or any model of the "
                           "teacher's sample shape and steps, e.g. the teacher itself)"}
METAVARS = {"report_to": "TRACKERS", "push_to_hub": "REPO_ID", "prep_ckpt_every": "SECONDS", "consistency_grid": "N"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same result on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _setting_flags(p: argparse.ArgumentParser, cls, helps: dict) -> None:
    """A flag for each setting of ``cls`` that ``helps`` names, parsed as the setting's kind within
    its choices (settings.py: one definition, no copied lists), on/off for a bool. argparse's own
    default stays None, so that a run tells a flag given from one left out."""
    from dataclasses import fields

    from .settings import STEPS

    kinds = {f.name: f.metadata for f in fields(cls)}
    for name, help in helps.items():
        m, flag = kinds[name], f"--{name.replace('_', '-')}"
        if m["kind"] is bool:
            p.add_argument(flag, action="store_true", default=None, help=help)
            continue
        kind = _steps if m["kind"] is STEPS else m["kind"] if m["kind"] in (int, float) else None
        p.add_argument(flag, type=kind, choices=m["choices"], metavar=METAVARS.get(name), help=help)


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


def build_parser() -> argparse.ArgumentParser:
    from .settings import DATA_DEFAULTS, DISTILL_RULED, DistillSettings, FewstepSettings, TrainSettings, defaults_of

    ap = _Parser(prog="dkdm", description="Data-free knowledge distillation for diffusion models.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True)

    tr, di, fs = _run_parsers(sub)
    tools = _tool_parsers(sub)
    _show_defaults(tr, defaults_of(TrainSettings), per_data=DATA_DEFAULTS)
    _show_defaults(di, defaults_of(DistillSettings), ruled=DISTILL_RULED)
    _show_defaults(fs, defaults_of(FewstepSettings), ruled=DISTILL_RULED)
    for p in tools:
        _show_defaults(p, {"seed": 0})
    return ap


def _run_parsers(sub) -> tuple[argparse.ArgumentParser, ...]:
    """train, distill and fewstep: each setting of the command's class (settings.py) a flag."""
    from .settings import DistillSettings, FewstepSettings, TrainSettings

    tr = sub.add_parser("train", help="ordinary data-based training (teachers and baselines)")
    di = sub.add_parser("distill", help="data-free distillation of a teacher into a student (DKDM)", description=(
        "Data-free distillation (DKDM). --batch, --steps, --lr, --warmup, --ema and --grad-clip not given (by flag or "
        "--config) follow from the student's size and the problem (T, sample size), the same rules for every "
        "teacher; the run prints each with its reason."))
    fs = sub.add_parser("fewstep", help="make a distilled student a K-step sampler (consistency distillation, data-free)",
                        description=(
        "The second stage: a student of any architecture (the --out of `dkdm distill`) becomes a K-step sampler by "
        "consistency distillation on the teacher's pool or by distribution matching, reading nothing but the "
        "teacher (by default the one the student was distilled from). Saved as a diffusers DDPMPipeline with an "
        "LCMScheduler (its README shows the loop at the student's K timesteps); `dkdm sample` / `evaluate` use "
        "its K steps."))
    teacher = {"teacher": TEACHER_HELP, "teacher_config": "guided-diffusion flags (YAML/JSON) of an ADM checkpoint --teacher"}
    few_teacher = TEACHER_HELP + " (default: the teacher --student was distilled from, as it records it)"
    for p, cls, tables in (
            (tr, TrainSettings, [TRAIN_HELP]),
            (di, DistillSettings, [teacher, {"student": STUDENT_HELP["distill"]}, DISTILL_HELP, POOL_HELP]),
            (fs, FewstepSettings, [{**teacher, "teacher": few_teacher}, {"student": STUDENT_HELP["fewstep"]},
                                   POOL_HELP, FEWSTEP_HELP])):
        _common(p)
        p.add_argument("--resume", action="store_true", help=RESUME_HELP)  # False, not None: never a --config's
        for helps in (RUN_HELP, *tables):
            _setting_flags(p, cls, helps)
    return tr, di, fs


def _tool_parsers(sub) -> list[argparse.ArgumentParser]:
    """synth, convert, sample, push, report and evaluate: the tools around a run."""
    sy = sub.add_parser("synth", help="sample a synthetic data set from a teacher (the data-free baseline's data)")
    _common(sy)
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
    _common(sa)
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
    _common(ev)
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
