"""The ``dkdm`` command line: train, distill, sample, evaluate.

Settings come from built-in defaults, then a YAML file (``--config``), then flags. A user
mistake prints one line and exits 2; a diverged run exits 3; an interrupt checkpoints and exits
130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import DkdmError
from .peers import PeerLost

#: Settings that suit each built-in data set (flags and --config override them).
DATA_DEFAULTS = {
    "toy2d": {"model": "mlp:width=128,depth=3", "schedule": "linear", "diffusion_steps": 100, "batch": 256, "lr": 1e-3,
              "ema": 0.995, "steps": 3000},
    "digits": {"model": "unet:widths=32-64,layers=2,groups=8", "schedule": "cosine",
               "diffusion_steps": 1000, "batch": 128, "lr": 5e-4, "ema": 0.999, "steps": 12000,
               "warmup": 200},
}
#: Distillation settings that ``defaults.distill_defaults`` derives from the student and the problem
#: where neither flags nor --config give them (the same rules for every teacher).
DISTILL_RULED = {"steps": None, "batch": None, "lr": None, "ema": None, "grad_clip": None, "warmup": None}
COMMON_DEFAULTS = {
    "seed": 0, "steps": 2000, "batch": 128, "lr": 1e-4, "weight_decay": 0.0, "ema": 0.9999,
    "grad_clip": 1.0, "warmup": 0, "mixed_precision": "no", "log_every": 50, "ckpt_every": 500,
    "keep_checkpoints": 2, "vlb_weight": 1.0, "no_report": False,
    "eval_num": None, "eval_steps": None, "compile": False, "channels_last": False, "cuda_graphs": False,
    "eval_every": None, "monitor_num": 1000, "monitor_steps": None, "patience": None, "max_steps": None,
}
TRAIN_DEFAULTS = {"data": "toy2d", "real_fraction": None, "synthetic": None, "model": None, "schedule": "cosine", "diffusion_steps": 1000,
                  "variance": "learned_range", "prediction": "epsilon"}
DISTILL_DEFAULTS = {"teacher": "builtin:digits", "teacher_config": None, "student": None, "student_steps": None, "guidance": 1.0, "teacher_dtype": "float32", "pool": "dynamic", "rho": 0.4,
                    "pool_dtype": "float32", "prep_batch": None, "prep": "auto", "prep_steps": None, "prep_ckpt_every": 300.0,
                    "variance": "learned_range", "heldout": 512, "reference": None,
                    "inception_weights": None}


def _common(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same result on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not training:
        return
    p.add_argument("--out", help="run directory to create (it becomes the model directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=_steps,
                   help="training iterations, or auto (distill): stop when the held-out error and the data-free "
                        "score stop improving (see --patience, --max-steps)")
    p.add_argument("--batch", type=int, help="training batch size B")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--ema", type=float, help="EMA decay of the saved weights")
    p.add_argument("--grad-clip", type=float, help="gradient-norm clip (0: off)")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int, help="checkpoint every K steps")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--vlb-weight", type=float, help="lambda on L*vlb (default 1: the authors' code)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the networks (the student; in distill also the teacher); the first steps are "
                        "slow while it compiles")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last weights for convolutional networks (PyTorch advises it for convolutions on GPUs in "
                        "reduced precision; measure with bench/speed.py)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay each student update (in distill also the pool's teacher step) as a CUDA graph: one "
                        "launch instead of hundreds (needs a CUDA device; not with --compile, fp16 or several processes)")
    p.add_argument("--no-report", action="store_true", default=None,
                   help="skip the final samples / metrics report")
    p.add_argument("--eval-num", type=int, help="samples for the final report (default: per data set)")
    p.add_argument("--eval-steps", type=int, help="sampling steps for the final report (default: per data set)")
    p.add_argument("--eval-every", type=int,
                   help="score the EMA model every N steps (held-out error, data-free score, the run's metric): "
                        "log.jsonl and training.png")
    p.add_argument("--monitor-num", type=int, help="samples drawn at each --eval-every evaluation (default 1000)")
    p.add_argument("--monitor-steps", type=int, help="sampling steps of each --eval-every evaluation (default 25)")
    p.add_argument("--patience", type=int,
                   help="--steps auto: evaluations without a 1%% improvement of both scores before stopping (default 4)")
    p.add_argument("--max-steps", type=int,
                   help="--steps auto: the most steps to train (default: 4x the fixed default budget)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dkdm", description="Data-free knowledge distillation for diffusion models.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="ordinary data-based training (teachers and baselines)")
    _common(tr, True)
    tr.add_argument("--data", help="built-in data set (toy2d, digits) or a sample set written by `dkdm synth`")
    tr.add_argument("--real-fraction", type=float,
                    help="data-limited baseline: keep this percentage of --data, fill up with --synthetic samples")
    tr.add_argument("--synthetic", help="sample set (from `dkdm synth`) that fills up a --real-fraction set")
    tr.add_argument("--model", help="architecture spec, e.g. mlp:width=128,depth=3")
    tr.add_argument("--schedule", choices=["linear", "cosine", "scaled_linear"])
    tr.add_argument("--diffusion-steps", type=int, help="T, the number of diffusion steps")
    tr.add_argument("--variance", choices=["learned_range", "fixed_small", "fixed_large"])
    tr.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"])

    di = sub.add_parser("distill", help="data-free distillation of a teacher into a student (DKDM)",
                        description="Data-free distillation (DKDM). --batch, --steps, --lr, --warmup, --ema and "
                                    "--grad-clip not given (by flag or --config) follow from the student's size and the "
                                    "problem (T, sample size), the same rules for every teacher; the run prints each "
                                    "with its reason.")
    _common(di, True)
    di.add_argument("--teacher", help="teacher model directory, an ADM checkpoint (.pt/.safetensors), or builtin:digits (the default)")
    di.add_argument("--teacher-config", help="guided-diffusion flags (YAML/JSON) of an ADM checkpoint --teacher")
    di.add_argument("--student", help="student architecture spec (default: the teacher's family at every width / "
                                      "sqrt(2), about half its parameters)")
    di.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"],
                    help="run the teacher's network in reduced precision (faster on GPUs; targets change slightly)")
    di.add_argument("--guidance", type=float,
                    help="classifier-free guidance scale of a class-conditional teacher's targets (1: none)")
    di.add_argument("--student-steps", type=int,
                    help="the student's diffusion steps: an even respacing of the teacher's (default: the same)")
    di.add_argument("--pool", choices=["iterative", "shuffled", "dynamic"])
    di.add_argument("--rho", type=float, help="dynamic pool size in batches per diffusion step (paper: 0.4)")
    di.add_argument("--pool-dtype", choices=["float32", "float16", "bfloat16"])
    di.add_argument("--prep-batch", type=int,
                    help="teacher batch size for pool preparation (default 256 on a CPU, 8192 on a GPU)")
    di.add_argument("--prep", choices=["auto", "exact", "sampled"],
                    help="pool preparation: exact (teacher chains, N*T/2 steps), sampled (K-step x0, noised by q), "
                         "or auto (the default: sampled where it is cheaper, K < T/2)")
    di.add_argument("--prep-steps", type=int, help="K, the teacher sampling steps of --prep sampled (default 25, at most T)")
    di.add_argument("--prep-ckpt-every", type=float, metavar="SECONDS",
                    help="checkpoint the pool preparation every SECONDS (default 300; 0: after every --prep-batch "
                         "chunk), so that --resume continues an interrupted preparation")
    di.add_argument("--variance", choices=["learned_range", "fixed_small", "fixed_large"],
                    help="student variance (learned_range trains it with L*vlb)")
    di.add_argument("--heldout", type=int,
                    help="pool states held out to score the student on with --eval-every (default 512; 0: none)")
    di.add_argument("--reference", help="data set the teacher learned (a built-in name), for the report's and "
                                        "--eval-every's data-set metrics (default: the one the teacher records); with "
                                        "--inception-weights an ADM reference batch or statistics (.npz) or a folder "
                                        "of images")
    di.add_argument("--inception-weights", help="local Inception weights (torch-fidelity's pt_inception file): "
                                                "--eval-every and the report score FID, IS, precision and recall "
                                                "against --reference")

    sy = sub.add_parser("synth", help="sample a synthetic data set from a teacher (the data-free baseline's data)")
    _common(sy, False)
    sy.add_argument("--teacher", default="builtin:digits", help="teacher model directory, ADM checkpoint, or builtin:NAME")
    sy.add_argument("--teacher-config", help="guided-diffusion flags (YAML/JSON) of an ADM checkpoint --teacher")
    sy.add_argument("--num", type=int, help="number of samples (default: the size of the teacher's training set)")
    sy.add_argument("--steps", type=int, default=100, help="teacher sampling steps (the paper: 1000 or 100)")
    sy.add_argument("--batch", type=int, default=1024)
    sy.add_argument("--out", required=True, help="sample set directory to create (train on it with --data DIR)")

    co = sub.add_parser("convert", help="turn an ADM / guided-diffusion checkpoint into a dkdm model directory")
    co.add_argument("--checkpoint", required=True, help="guided-diffusion state dict (.pt loaded weights-only, or .safetensors)")
    co.add_argument("--config", required=True, help="its guided-diffusion flags, YAML or JSON")
    co.add_argument("--out", required=True, help="model directory to create")
    co.add_argument("--format", choices=["dkdm", "diffusers"], default="dkdm",
                    help="dkdm: the ADM network as is; diffusers: a DDPMPipeline with an equivalent UNet2DModel")

    sa = sub.add_parser("sample", help="draw samples from a model directory")
    _common(sa, False)
    sa.add_argument("--model", required=True, help="model directory")
    sa.add_argument("--num", type=int, default=1000)
    sa.add_argument("--steps", type=int, help="sampling steps (default: all diffusion steps)")
    sa.add_argument("--batch", type=int, default=1024)
    sa.add_argument("--out", required=True, help="output file: .npz (arrays) or .png (image grid)")

    ev = sub.add_parser("evaluate", help="metrics of a model's samples against a reference, as JSON")
    _common(ev, False)
    ev.add_argument("--model", required=True, help="model directory")
    ev.add_argument("--reference", help="built-in data set (default: the one the model or its teacher learned); with "
                                        "--inception-weights an ADM reference batch or statistics (.npz) or a folder "
                                        "of images")
    ev.add_argument("--inception-weights", help="local Inception weights (torch-fidelity's pt_inception file): FID, IS, "
                                                "precision and recall of RGB models against --reference")
    ev.add_argument("--num", type=int, help="number of samples (default: the metric's fixed count)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: all diffusion steps)")
    return ap


def _steps(text: str):
    """--steps: a number of iterations, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or auto, got {text!r}")


def _settings(args, *defaults) -> dict:
    """defaults <- --config YAML <- flags given on the command line."""
    merged: dict = {}
    for d in defaults:
        merged.update(d)
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DkdmError(f"cannot read config {path}: {e.__class__.__name__}: {e}")
        if not isinstance(loaded, dict):
            raise DkdmError(f"config {path} must be a YAML mapping of settings")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = set(loaded) - set(merged)
        if unknown:
            raise DkdmError(f"config {path}: unknown setting(s) {', '.join(sorted(unknown))}")
        merged.update(loaded)
    for k, v in vars(args).items():
        if v is not None and k in merged:
            merged[k] = v
    return merged


def _default_out(command: str) -> str:
    import time

    return str(Path("dkdm-runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_out(s: dict) -> Path:
    if not s.get("out"):
        raise DkdmError("--out DIR is required: the run directory to create")
    out = Path(s["out"])
    if out.exists() and not out.is_dir():
        raise DkdmError(f"--out {out} is a file; choose a directory path")
    from .runlock import LOCK

    if s.get("resume"):
        from .checkpoint import has_preparation, list_checkpoints

        if not list_checkpoints(out / "checkpoints") and not has_preparation(out):
            raise DkdmError(f"--resume: {out} has no checkpoint to resume from; drop --resume to start afresh")
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise DkdmError(f"--out {out} already holds a run; pass --resume to continue it or choose another directory")
    return out


def _train_config(s: dict, fixed_default: int | None = None):
    """The loop's settings; ``--steps auto`` trains up to --max-steps (default 4x ``fixed_default``)
    and evaluates every --eval-every steps (default: a 20th of the fixed default budget)."""
    from .trainer import TrainConfig

    if s["steps"] == "auto":
        if fixed_default is None:
            raise DkdmError("--steps auto needs a teacher (it watches the held-out error and data-free score of "
                            "`dkdm distill`); give train a number of steps")
        s["max_steps"] = int(s["max_steps"] or 4 * fixed_default)
        s["eval_every"] = int(s["eval_every"] or max(1, fixed_default // 20))
        s["patience"] = int(4 if s["patience"] is None else s["patience"])
        if s["patience"] < 1 or s["max_steps"] < 1:
            raise DkdmError(f"--patience and --max-steps must be at least 1, got {s['patience']} and {s['max_steps']}")
    else:
        for key in ("max_steps", "patience"):
            if s.get(key) is not None:
                raise DkdmError(f"--{key.replace('_', '-')} goes with --steps auto; with a fixed --steps it has no effect")
    cfg = TrainConfig(
        steps=int(s["max_steps"] if s["steps"] == "auto" else s["steps"]), lr=float(s["lr"]),
        weight_decay=float(s["weight_decay"]),
        ema_decay=float(s["ema"]), grad_clip=float(s["grad_clip"]), warmup=int(s["warmup"]),
        mixed_precision=s["mixed_precision"], log_every=int(s["log_every"]), ckpt_every=int(s["ckpt_every"]),
        keep_checkpoints=int(s["keep_checkpoints"]), vlb_weight=float(s["vlb_weight"]),
        compile=bool(s["compile"]), channels_last=bool(s["channels_last"]), cuda_graphs=bool(s["cuda_graphs"]),
    )
    cfg.validate()
    if int(s["batch"]) < 1:
        raise DkdmError(f"--batch must be at least 1, got {s['batch']}")
    return cfg


def _monitor_config(s: dict):
    """The settings of --eval-every / --steps auto, checked (None: the run is not watched)."""
    if s.get("eval_every") is None:
        return None
    from .monitor import MonitorConfig

    config = MonitorConfig(every=int(s["eval_every"]), num=int(s["monitor_num"]),
                           steps=None if s["monitor_steps"] is None else int(s["monitor_steps"]),
                           heldout=int(s.get("heldout") or 0), seed=int(s["seed"]),
                           patience=int(s["patience"] or 0))
    config.validate()
    return config


def _monitor(config, trainer, teacher=None, pool=None, reference=None, guidance: float = 1.0, progress=True):
    """The --eval-every / --steps auto callback of a run, or None."""
    if config is None:
        return None
    from .monitor import Monitor

    return Monitor(trainer.student, trainer.out, config, trainer.cfg.steps, teacher=teacher, pool=pool,
                   reference=reference, vlb_weight=trainer.cfg.vlb_weight, guidance=guidance,
                   device=trainer.accelerator.device, progress=progress)


def _run(trainer, s: dict, out: Path, args, prepare=None, teacher=None, monitor=None, reference=None) -> None:
    """``_run_locked`` holding the run directory's lock (one run per directory)."""
    from .runlock import RunLock

    acc = trainer.accelerator
    lock, created, error = RunLock(out), not out.exists(), ""
    if acc.is_main_process:
        try:
            lock.acquire()
        except DkdmError as e:
            error = str(e)
    if acc.num_processes > 1:  # every process stops if the main one could not take the lock
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise DkdmError(error)
    try:
        _run_locked(trainer, s, out, args, prepare, teacher, monitor, reference)
    finally:
        lock.release()
        if created and acc.is_main_process and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no directory behind


def _run_locked(trainer, s: dict, out: Path, args, prepare=None, teacher=None, monitor=None, reference=None) -> None:
    """Resume or start (optionally preparing the pool first, then checkpointing it), train, report
    (against ``reference``, default: the data set the student records)."""
    import torch

    from .checkpoint import drop_preparation, list_checkpoints
    from .evaluation import summary_table, write_report
    from .model import load_model
    from .runlock import check_free_space

    acc = trainer.accelerator
    main = acc.is_main_process
    acc.wait_for_everyone()  # every process has checked --out before the main one writes into it
    if monitor is not None and main:
        print(monitor.cost(), file=sys.stderr)
    if s.get("resume") and list_checkpoints(trainer.ckpt_dir):
        step = trainer.resume()
        if main:
            drop_preparation(out)  # left by a run killed between its first checkpoint and dropping it
            print(f"resuming {out} from step {step}", file=sys.stderr)
            if monitor is not None and monitor.setup(resume=True):
                trainer.cfg.steps = step  # the rule had already stopped the run at its last checkpoint
    else:
        if prepare is not None:
            check_free_space(out, 2 * trainer.checkpoint_bytes(), "the pool's preparation and first checkpoints")
            prepare(bool(s.get("resume")))
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "run.json").write_text(json.dumps({**s, "processes": acc.num_processes}, indent=1, default=str))
            if monitor is not None:
                monitor.setup()
        torch.manual_seed(int(s["seed"]) + 1)
        acc.wait_for_everyone()
        trainer.save()
        if main:  # the first checkpoint holds the prepared pool
            drop_preparation(out)
    if monitor is not None:
        trainer.callbacks.append(monitor)
    last = trainer.train()
    if not main:
        return
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}))
    if monitor is not None:
        monitor.plot()  # with the last loss line
    if trainer.stop_reason:
        print(f"stopped at step {trainer.step}: {trainer.stop_reason}", file=sys.stderr)
    reference = reference if reference is not None else trainer.student.extra.get("data")
    if (reference or teacher is not None) and not s.get("no_report"):
        model = load_model(out, device=acc.device)
        heldout = {k: v for k, v in monitor.last.items() if k.startswith("heldout_")} if monitor else None
        rows = write_report(out, model, reference, teacher=teacher, teacher_dir=s.get("teacher") and
                            _model_dir(s["teacher"]), seed=int(s["seed"]), progress=not args.no_progress,
                            num=s["eval_num"], steps=s["eval_steps"], guidance=float(s.get("guidance") or 1.0),
                            heldout=heldout)
        print(summary_table(rows))
        written = [f for f in ("metrics.json", "samples.png", "training.png", "stop.json") if (out / f).exists()]
        print(f"run directory: {out} ({', '.join(written)})", file=sys.stderr)


def _rank_seed(s: dict, acc) -> int:
    """Each process draws its own batches (its own pool shard): the seed is offset by the rank.
    Rank 0 keeps the run's seed, so a single process reproduces earlier runs."""
    return int(s["seed"]) + 100003 * acc.process_index


def _teacher_ref(teacher) -> str:
    """How a run records its teacher: builtin names and Hub ids as given, paths made absolute."""
    from .teachers.diffusers_dir import looks_like_hub_id

    text = str(teacher)
    return text if text.startswith("builtin:") or looks_like_hub_id(text) else str(Path(text).resolve())


def _model_dir(path):
    from .model import resolve_model_dir

    return resolve_model_dir(path)


def cmd_train(args) -> None:
    import torch
    from .data import DataSource, MixedSet, SampleSet, load_dataset, reference_of
    from .diffusion import Schedule
    from .model import DiffusionModel
    from .trainer import Trainer, make_accelerator

    data_name = args.data or TRAIN_DEFAULTS["data"]
    dataset = load_dataset(data_name)
    if (args.real_fraction is None) != (args.synthetic is None):
        raise DkdmError("--real-fraction P and --synthetic DIR go together: P% of --data, the rest from DIR")
    if args.real_fraction is not None:
        if not hasattr(dataset, "images") or isinstance(dataset, SampleSet):
            raise DkdmError(f"--real-fraction needs a built-in image data set as --data (digits), got {data_name}")
        dataset = MixedSet(dataset, SampleSet(args.synthetic), args.real_fraction, seed=args.seed or 0)
    reference = reference_of(dataset)
    s = _settings(args, COMMON_DEFAULTS, TRAIN_DEFAULTS, DATA_DEFAULTS.get(reference, {}), {"out": None, "resume": False})
    s["model"] = s["model"] or "mlp"
    cfg = _train_config(s)
    watch = _monitor_config(s)
    out = _check_out(s)
    if int(s["diffusion_steps"]) < 2:
        raise DkdmError(f"--diffusion-steps must be at least 2, got {s['diffusion_steps']}")
    schedule = Schedule.named(s["schedule"], int(s["diffusion_steps"]))
    torch.manual_seed(int(s["seed"]))
    model = DiffusionModel.build(
        s["model"], dataset.sample_shape, schedule, variance=s["variance"], prediction=s["prediction"],
        clip_x0=dataset.clip_x0, extra={"data": reference, **({"trained_on": dataset.name} if dataset.name != reference else {})},
    )
    acc = make_accelerator(cfg.mixed_precision)
    classes = getattr(dataset, "num_classes", 0)
    if model.num_classes and model.num_classes != classes:
        raise DkdmError(f"the model conditions on {model.num_classes} classes but {dataset.name} has "
                        f"{classes or 'no'} labels; use classes={classes} in the spec" if classes else
                        f"the model conditions on classes but {dataset.name} has no labels; drop classes= from the spec")
    source = DataSource(dataset, schedule, int(s["batch"]), seed=_rank_seed(s, acc), device=acc.device,
                        conditional=bool(model.num_classes))
    info = {"student": model.describe(), "source": source.describe()}
    trainer = Trainer(model, source, cfg, out, info, progress=not args.no_progress, accelerator=acc)
    _run(trainer, s, out, args, monitor=_monitor(watch, trainer, reference=reference, progress=not args.no_progress))


def cmd_distill(args) -> None:
    import math

    import torch
    from tqdm.auto import tqdm

    from .defaults import describe, distill_defaults, step_budget
    from .model import DiffusionModel, load_model
    from .pool import (KnowledgePool, pool_memory_bytes, pool_size, preparation_batch, preparation_cost,
                       resolve_preparation)
    from .students import count_parameters, format_spec
    from .trainer import Trainer, make_accelerator

    s = _settings(args, COMMON_DEFAULTS, DISTILL_DEFAULTS, DISTILL_RULED, {"out": None, "resume": False})
    acc = make_accelerator(s["mixed_precision"])
    teacher = load_model(s["teacher"], device=acc.device, role="teacher", config=s["teacher_config"])
    teacher.requires_grad_(False)
    teacher.set_inference_dtype(s["teacher_dtype"])
    if s["channels_last"]:
        teacher.net.to(memory_format=torch.channels_last)
    if s["compile"]:
        teacher.net = torch.compile(teacher.net)
    s["out"] = s["out"] or _default_out("distill")
    reference, data_name = _distill_reference(s, teacher, acc.device)
    teacher_ref = _teacher_ref(s["teacher"])
    if s["student_steps"] is not None:
        # the pool runs the teacher on the student's steps, so every batch is a step the student takes
        teacher = teacher.respaced(int(s["student_steps"]))
    torch.manual_seed(int(s["seed"]))
    student = DiffusionModel.student_of(teacher, s["student"], variance=s["variance"],
                                        extra={"data": data_name, "teacher": teacher_ref})
    # what flags and --config leave open follows from the student and the problem
    ruled = distill_defaults(count_parameters(student.net), teacher.sample_shape, teacher.schedule.num_steps,
                             {k: s[k] for k in DISTILL_RULED})
    s.update({k: v.value for k, v in ruled.items()})
    cfg = _train_config(s, fixed_default=step_budget(teacher.schedule.num_steps, math.prod(teacher.sample_shape),
                                                     int(s["batch"])))
    watch = _monitor_config(s)
    size = pool_size(s["pool"], float(s["rho"]), teacher.schedule.num_steps, int(s["batch"]))
    out = _check_out(s)
    T = teacher.schedule.num_steps
    if s["prep_steps"] is None:  # 25 sampling steps, or all of a shorter process
        s["prep_steps"] = min(25, T)
    mem = pool_memory_bytes(size, teacher.sample_shape, s["pool_dtype"])
    s["prep"] = resolve_preparation(s["prep"], T, int(s["prep_steps"]))
    prep_batch = preparation_batch(None if s["prep_batch"] is None else int(s["prep_batch"]), acc.device)
    if not float(s["prep_ckpt_every"]) >= 0:
        raise DkdmError(f"--prep-ckpt-every must be >= 0 seconds, got {s['prep_ckpt_every']}")
    prep = preparation_cost(s["pool"], size, T, s["prep"], int(s["prep_steps"]))
    pool = KnowledgePool(teacher, int(s["batch"]), s["pool"], float(s["rho"]), s["pool_dtype"],
                         seed=_rank_seed(s, acc), device=acc.device, preparation=s["prep"], prep_steps=int(s["prep_steps"]),
                         guidance=float(s["guidance"]))
    info = {"student": student.describe(), "source": pool.describe(), "teacher": teacher_ref}
    trainer = Trainer(student, pool, cfg, out, info, progress=not args.no_progress, accelerator=acc)

    def prepare(resume: bool):
        """A new run, or one stopped while preparing: announce it, prepare (or finish preparing) the pool."""
        from .checkpoint import PreparationCheckpoints

        n = acc.num_processes
        saver = PreparationCheckpoints(out, acc.process_index, {**info, "seed": s["seed"], "processes": n},
                                       every_s=float(s["prep_ckpt_every"]))
        state = saver.latest(warn=lambda m: print(m, file=sys.stderr)) if resume else None
        if acc.is_main_process:
            print(f"student: {format_spec(student.spec)}, {count_parameters(student.net):,} parameters (teacher: "
                  f"{count_parameters(teacher.net):,}){'' if s['student'] else '; --student SPEC picks another'}",
                  file=sys.stderr)
            if ruled:
                print(f"defaults: {describe(ruled)}", file=sys.stderr)
            if reference is None and teacher.decoder is None:
                from .data import builtin_names_of_shape

                names = builtin_names_of_shape(teacher.sample_shape)
                if names:
                    print(f"the teacher records no data set, so the report has the data-free score only; its samples "
                          f"have the shape of {' / '.join(names)}: --reference NAME adds that data set's metrics",
                          file=sys.stderr)
            print(
                f"pool: {s['pool']}, {size} entries x {list(teacher.sample_shape)} {s['pool_dtype']} = {mem / 2**20:.1f} MiB; "
                f"{s['prep']} preparation ~{prep:,} teacher sample-steps; training {'up to ' * (s['steps'] == 'auto')}"
                f"{cfg.steps * int(s['batch']):,} teacher "
                f"sample-forwards" + (f" (each of {n} processes: its own pool shard and batches)" if n > 1 else ""),
                file=sys.stderr,
            )
            if state is not None:
                print(f"resuming the pool preparation: {int(state['prep_done']):,} of {size:,} entries were prepared",
                      file=sys.stderr)
        with tqdm(total=prep, desc="pool", unit="step", unit_scale=True,
                  disable=args.no_progress or prep == 0 or not acc.is_main_process, dynamic_ncols=True) as bar:
            pool.prepare(chunk=prep_batch, progress=bar, resume=state, on_chunk=saver)

    monitor = _monitor(watch, trainer, teacher, pool, reference, float(s["guidance"]), progress=not args.no_progress)
    _run(trainer, s, out, args, prepare, teacher=teacher, monitor=monitor, reference=reference)


def _distill_reference(s: dict, teacher, device):
    """What the run is scored against (--eval-every, the report) and the built-in data set the student
    records: the teacher's data set; a built-in one named by --reference; or, with
    --inception-weights, the user's RGB reference (ADM batch, statistics or image folder)."""
    data_name = teacher.extra.get("data")
    if s["inception_weights"]:
        from .evaluation import reference_for
        from .metrics.inception import check_rgb, check_weights

        check_weights(s["inception_weights"])
        if teacher.decoder is None:
            check_rgb(teacher.sample_shape)
        if not s["reference"]:
            raise DkdmError("--inception-weights scores against a reference you supply: --reference REF.npz (an ADM "
                            "reference batch or statistics) or a folder of images")
        return reference_for(s["reference"], s["inception_weights"], device), data_name
    if s["reference"]:
        from .evaluation import check_reference

        check_reference(s["reference"], None if teacher.decoder is not None else teacher.sample_shape)
        return s["reference"], s["reference"]
    return data_name, data_name


def _reference_for(model_dir, given):
    from .model import read_model_config

    if given:
        return given
    cfg = read_model_config(model_dir)
    if cfg.get("data"):
        return cfg["data"]
    raise DkdmError(f"{model_dir} does not record its data set; pass --reference NAME")


def cmd_synth(args) -> None:
    import time

    from .data import save_sample_set
    from .evaluation import draw
    from .model import load_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DkdmError(f"--out {out} already exists; choose a new directory for the sample set")
    model = load_model(args.teacher, role="teacher", config=args.teacher_config)
    data = model.extra.get("data")
    num = args.num
    if num is None:
        from .data import builtin_dataset

        ref = builtin_dataset(data) if data else None
        if ref is None or not hasattr(ref, "images"):
            raise DkdmError(f"the teacher does not record an image data set whose size to match; pass --num N")
        num = len(ref.images)
    if args.batch < 1:
        raise DkdmError(f"--batch must be at least 1, got {args.batch}")
    seed = args.seed or 0
    t0 = time.time()
    x = draw(model, num, args.steps, seed, not args.no_progress, batch_size=args.batch)
    teacher_ref = _teacher_ref(args.teacher)
    save_sample_set(out, x, {"reference": data, "teacher": teacher_ref, "steps": args.steps, "seed": seed,
                             "clip_x0": model.clip_x0, "teacher_sample_steps": num * args.steps,
                             "wall_s": round(time.time() - t0, 2)})
    if x.dim() == 4:
        from .images import save_grid

        save_grid(x[:100], out / "preview.png", nrow=10)
    print(f"wrote {num} teacher samples ({args.steps} steps, {num * args.steps:,} teacher sample-steps) to {out}; "
          f"train on them with: dkdm train --data {out}", file=sys.stderr)


def cmd_convert(args) -> None:
    from .model import load_checkpoint_file

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DkdmError(f"--out {out} already exists; choose a new directory")
    model = load_checkpoint_file(args.checkpoint, args.config, role="checkpoint")
    if args.format == "diffusers":
        from diffusers import DDPMPipeline

        from .model import ddpm_scheduler
        from .teachers.adm import to_diffusers

        unet = to_diffusers(model.spec, model.net.adm)
        scheduler = ddpm_scheduler(model.schedule, model.variance, model.prediction, model.clip_x0)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    else:
        model.save(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: ADM UNet, {n:,} parameters, {model.variance} variance, {model.prediction} prediction, "
          f"T={model.schedule.num_steps}; use it as --teacher {out}", file=sys.stderr)


def cmd_sample(args) -> None:
    import numpy as np

    from .evaluation import draw
    from .model import load_model

    out = Path(args.out)
    if out.suffix not in (".npz", ".png"):
        raise DkdmError(f"--out {out}: write samples as .npz (arrays) or .png (an image grid)")
    if args.num < 1:
        raise DkdmError(f"--num must be at least 1, got {args.num}")
    model = load_model(args.model)
    if out.suffix == ".png" and len(model.sample_shape) != 3:
        raise DkdmError(f"--out {out}: a PNG grid needs image samples; this model draws {list(model.sample_shape)} vectors, use .npz")
    x = draw(model, args.num, args.steps, args.seed or 0, not args.no_progress)
    latents, x = x, model.decode(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from .images import save_grid

        save_grid(x, out)
    else:
        arrays = {"samples": x.numpy(), **({"latents": latents.numpy()} if model.decoder is not None else {})}
        if x.dim() == 4 and x.shape[1] == 3:  # RGB: also as the ADM evaluator reads a sample batch
            from .metrics.inception import to_uint8

            arrays["arr_0"] = to_uint8(x).permute(0, 2, 3, 1).numpy()
        np.savez(out, **arrays)
    print(f"wrote {args.num} samples {list(x.shape[1:])} to {out}", file=sys.stderr)


def _evaluate_rgb(args) -> None:
    """Inception metrics of an RGB model (a latent model's decoded samples) against the user's reference."""
    import torch

    from .evaluation import default_num, evaluate_model, reference_for
    from .metrics.inception import check_rgb, check_weights
    from .model import load_model

    check_weights(args.inception_weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    if model.decoder is None:
        check_rgb(model.sample_shape)
    if not args.reference:
        raise DkdmError("Inception metrics compare with a reference you supply: --reference REF.npz (an ADM reference "
                        "batch, arr_0 uint8 images, or statistics mu/sigma) or a folder of images")
    metric = reference_for(args.reference, args.inception_weights, device)
    num = args.num or default_num(metric)
    steps = args.steps or model.schedule.num_steps
    against = (f"{args.reference} ({len(metric.reference):,} images, their features cached)" if len(metric.reference)
               else f"the statistics in {args.reference}")
    print(f"scoring {num:,} samples of {steps} steps ({num * steps:,} model sample-steps) against {against}",
          file=sys.stderr)
    result, _ = evaluate_model(model, _model_dir(args.model), metric, num, args.steps, args.seed or 0,
                               not args.no_progress)
    print(json.dumps({"model": str(args.model), **result}))


def cmd_evaluate(args) -> None:
    from .data import builtin_dataset
    from .evaluation import evaluate_model
    from .model import load_model

    if args.inception_weights:
        return _evaluate_rgb(args)
    ref = _reference_for(args.model, args.reference)
    dataset = builtin_dataset(ref)
    model = load_model(args.model)
    if tuple(model.sample_shape) != tuple(dataset.sample_shape):
        raise DkdmError(f"model samples have shape {list(model.sample_shape)} but {ref} has {list(dataset.sample_shape)}")
    result, _ = evaluate_model(model, _model_dir(args.model), ref, args.num, args.steps, args.seed or 0,
                               not args.no_progress)
    print(json.dumps({"model": str(args.model), **result}))


COMMANDS = {"train": cmd_train, "distill": cmd_distill, "synth": cmd_synth, "convert": cmd_convert, "sample": cmd_sample, "evaluate": cmd_evaluate}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except DkdmError as e:
        one_line = " | ".join(part.strip() for part in str(e).splitlines() if part.strip())
        print(f"dkdm {args.command}: error: {one_line}", file=sys.stderr, flush=True)
        if isinstance(e, PeerLost):
            # nothing is left to write, the teardown of the broken process group can block on the
            # dead peer, and the launcher's SIGTERM is on its way: leave now, with the exit code
            sys.stdout.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"dkdm {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
