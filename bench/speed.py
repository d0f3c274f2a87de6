"""Where the time of a DKDM step goes, measured in one run (never a timed unit test).

For a teacher, students and a batch size it measures, in the same process, through dkdm's own
Trainer, pool and networks:
  (b) the isolated teacher reverse step of a batch (what the pool adds per training step),
  (u) the isolated student update (forward, loss, backward, clipping, optimizer, EMA) on a fixed
      batch, through the Trainer's loop,
  (c) the DKDM step (the Trainer's loop on a dynamic pool), and the ratios (c) / ((b) + (u)):
      1.0 means the pool costs nothing beyond the teacher's forward, and (c) / ((a) + (b)),
  (a) a data-based step (the Trainer's loop on data drawn on the device),
  samples/s of DKDM training, peak memory per student, the teacher's arithmetic rate (FLOPs of
  its forward / (b)) against the device's measured matmul rate (bf16 on a GPU, float32 on a CPU),
  and for the digits set-up (d) pool preparation throughput (exact and sampled).
Each step of a window of whole steps after warm-up (bench/window.py) is timed with CUDA events on
a GPU (perf_counter on a CPU); the four measurements run in rounds, one after the other (3 rounds
on a CPU), and each reports its median step: robust to other work taking the machine for a while. A row per student is added to bench/RESULTS.md as soon as it is
measured, so a run cut short keeps what it measured.

Scales:
  digits (default): the bundled digits teacher and the default student, batch 64;
  cifar10: an ADM teacher of the improved-DDPM CIFAR-10 layout with random weights (128 channels,
      3 res-blocks, channel_mult 1,2,2,2, attention at 16 and 8, learned sigma, cosine, T = 1000:
      52.5M parameters), students adm, unet and dit of about 10M, batch 128, 3x32x32;
  imagenet64: the improved-DDPM ImageNet-64 layout (channel_mult 1,2,3,4: 121M), same students, 3x64x64.
``--tiny`` shrinks a scale's networks and batch so that its code path runs in seconds on a CPU.

    python bench/speed.py                                   # digits, default student
    python bench/speed.py --scale cifar10 --mixed-precision bf16 --teacher-autocast bf16 --cuda-graphs
    python bench/speed.py --scale cifar10 --tiny --steps 2 --no-record    # the path, on a CPU
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from window import StepWindow

HERE = Path(__file__).resolve().parent

CIFAR10_TEACHER = {"num_channels": 128, "num_res_blocks": 3, "channel_mult": "1,2,2,2", "attention_resolutions": "16,8",
                   "learn_sigma": True, "noise_schedule": "cosine", "diffusion_steps": 1000}
STUDENTS = {  # about 10M parameters each at both scales
    "adm": "adm:num_channels=64,num_res_blocks=2,channel_mult=1-2-2-2,attention_resolutions=16-8",
    "unet": "unet:widths=64-128-128-128,layers=2,attn=1,groups=32",
    "dit": "dit:patch=2,depth=8,width=256,heads=4",
}
SCALES = {
    "cifar10": {"shape": (3, 32, 32), "batch": 128, "teacher": CIFAR10_TEACHER, "students": STUDENTS},
    "imagenet64": {"shape": (3, 64, 64), "batch": 128, "teacher": {**CIFAR10_TEACHER, "channel_mult": "1,2,3,4"},
                   "students": {**STUDENTS, "dit": "dit:patch=4,depth=8,width=256,heads=4"}},
}
TINY = {"batch": 2, "teacher": {**CIFAR10_TEACHER, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2"},
        "students": {"adm": "adm:num_channels=32,num_res_blocks=1,channel_mult=1-2,attention_resolutions=16",
                     "unet": "unet:widths=32-32,layers=1,attn=1,groups=8", "dit": "dit:patch=8,depth=1,width=32,heads=2"}}
#: The default student of the bundled digits teacher (students.default_student_spec; tests/test_bench.py checks it).
DIGITS_STUDENT = "unet:widths=24-48,layers=2"
FLOPS_TABLE = ("| date | device | scale | student | settings | teacher fwd GFLOP/sample | student fwd GFLOP/sample | "
               "student update GFLOP/sample | teacher MFU (measured matmul) | update MFU (measured matmul) | "
               "teacher MFU (vendor dense bf16) | update MFU (vendor dense bf16) |")
TABLE = ("| date | device | scale | teacher | student | B | settings | (b) teacher step ms | (u) student update ms | "
         "(c) DKDM step ms | (c)/((b)+(u)) | (a) data step ms | (c)/((a)+(b)) | samples/s | teacher TFLOP/s "
         "(% of matmul) | peak MiB | prep exact / sampled /s |")


class Clock:
    """Marks on the device's stream (CUDA events) or the host's clock; milliseconds between two marks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, stop) -> float:
        if not self.cuda:
            return 1000 * (stop - start)
        stop.synchronize()
        return start.elapsed_time(stop)

    def steps_ms(self, marks) -> list[float]:
        """The times between consecutive marks."""
        return [self.ms(a, b) for a, b in zip(marks, marks[1:])]


class FixedSource:
    """The same batch every step: the Trainer's loop on it is the isolated student update."""

    def __init__(self, batch, schedule, num_classes: int):
        self.batch, self.schedule, self.num_classes = batch, schedule, num_classes

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class RandomImages:
    """An image set on the device for the data-based step at scales without a built-in data set."""

    name, num_classes, clip_x0 = "random", 0, True

    def __init__(self, shape, device, n: int = 4096):
        self.sample_shape = tuple(shape)
        self.images = torch.rand(n, *shape, device=device) * 2 - 1


class _Autocast(torch.nn.Module):
    """The teacher's network under autocast: a bf16 teacher for every network kind (the ADM
    network's --teacher-dtype bfloat16 needs issue 15's fix)."""

    def __init__(self, net, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    def forward(self, *args):
        with torch.autocast(self.device_type, self.dtype):
            return self.net(*args)


def _loop_ms(make_trainer, source, clock: Clock, warm: int, n: int) -> list[float]:
    """Milliseconds of each of n steps of the Trainer's loop over ``source``, after ``warm``."""
    marks = []
    window = StepWindow(source, warm + 1, n, lambda i: marks.append(clock.mark()))
    trainer = make_trainer(window)
    trainer.cfg.steps = trainer.cfg.log_every = window.steps_needed
    trainer.train()
    return clock.steps_ms(marks)


def _forward_flops(teacher, batch, device) -> float:
    """FLOPs of one teacher forward of a batch, counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *teacher.sample_shape, device=device)
    t = torch.full((batch,), teacher.schedule.num_steps // 2, device=device)
    y = teacher.labels_for(batch, None, device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        teacher(x, t, y)
    return float(counter.get_total_flops())


def _student_flops(student, batch, device) -> tuple[float, float]:
    """FLOPs of the student's forward and of its update (forward + backward of a loss on the output)
    on a batch, counted by FlopCounterMode (matmuls and convolutions; elementwise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *student.sample_shape, device=device)
    t = torch.full((batch,), student.schedule.num_steps // 2, device=device)
    y = student.labels_for(batch, None, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(x, t, y)
    forward = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        student(x, t, y).square().mean().backward()
    student.zero_grad(set_to_none=True)
    return forward, float(counter.get_total_flops())


#: Vendors' dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of the device name.
VENDOR_BF16_PEAK = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def _vendor_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in VENDOR_BF16_PEAK.items() if k in name), None)


def _matmul_rate(device) -> tuple[str, float]:
    """The device's measured dense matmul rate in TFLOP/s: the roof the teacher is compared with."""
    gpu = device.type == "cuda"
    dtype, n = (torch.bfloat16, 4096) if gpu else (torch.float32, 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    for _ in range(3):
        a @ b
    reps, start = 20, clock.mark()
    for _ in range(reps):
        a @ b
    return str(dtype).removeprefix("torch."), 2 * n ** 3 * reps / (clock.ms(start, clock.mark()) / 1000) / 1e12


def _teacher(args, device):
    """The digits teacher, or an ADM teacher of the scale's layout with random weights."""
    from dkdm.formats import load_model
    from dkdm.model import DiffusionModel
    from dkdm.formats.adm import schedule_from_flags
    from dkdm.nets.adm import parse_flags

    if args.scale == "digits":
        return load_model(args.teacher, device=device, role="teacher")
    scale = SCALES[args.scale]
    flags = {"type": "adm", **(TINY if args.tiny else scale)["teacher"]}
    torch.manual_seed(0)
    return DiffusionModel.build(flags, scale["shape"], schedule_from_flags(parse_flags(flags)), clip_x0=True).to(device)


def _settings(args) -> str:
    on = [f"student {args.mixed_precision}" if args.mixed_precision != "no" else "",
          f"teacher {args.teacher_dtype}" if args.teacher_dtype != "float32" else "",
          f"teacher autocast {args.teacher_autocast}" if args.teacher_autocast != "no" else "",
          "channels-last" if args.channels_last else "", "compile" if args.compile else "",
          "cuda-graphs" if args.cuda_graphs else "", "tiny" if args.tiny else ""]
    return ", ".join(s for s in on if s) or "float32"


def _machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak, not per student


def add_row(path: Path, header: str, row: str, title: str) -> None:
    """Insert ``row`` at the end of the table whose header line is ``header`` (created under
    ``title`` at the end of the file if missing)."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    if header not in lines:
        lines += ["", title, "", header, "|" + "---|" * (header.count("|") - 1)]
    end = lines.index(header) + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")


def measure(args, report) -> None:
    """Measure every student, calling ``report(row)`` with each student's numbers as soon as they exist."""
    from accelerate import Accelerator

    from dkdm.cudagraphs import GraphedStep
    from dkdm.data import DataSource, builtin_dataset
    from dkdm.diffusion import Reverse, TrainingBatch
    from dkdm.model import DiffusionModel
    from dkdm.pool import KnowledgePool
    from dkdm.students import count_parameters
    from dkdm.devices import make_accelerator
    from dkdm.trainer import TrainConfig, Trainer

    acc = make_accelerator(args.mixed_precision) if args.device != "cpu" else Accelerator(
        cpu=True, mixed_precision=args.mixed_precision)
    device, clock = acc.device, Clock(acc.device)
    teacher = _teacher(args, device).eval().requires_grad_(False)
    teacher_params = count_parameters(teacher.net)
    if args.teacher_dtype != "float32":
        teacher.set_inference_dtype(args.teacher_dtype)
    if args.channels_last:
        teacher.net.to(memory_format=torch.channels_last)
    flops = _forward_flops(teacher, args.batch, device)
    if args.teacher_autocast != "no":
        teacher.net = _Autocast(teacher.net, device.type, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.teacher_autocast])
    if args.compile:
        teacher.net = torch.compile(teacher.net)
    matmul_dtype, matmul_tflops = _matmul_rate(device)
    warm, n = args.warmup, -(-args.steps // args.rounds)

    pool = KnowledgePool(teacher, args.batch, "dynamic", rho=args.rho, seed=0, device=device, preparation="sampled",
                         prep_steps=2 if args.tiny else 5)
    pool.prepare(chunk=args.prep_batch)
    # (b): the teacher's step on a fixed batch, as the training loop runs it (graphed or plain)
    x, s = pool.x[: args.batch].float(), pool.s[: args.batch].clamp(min=1)
    y = None if pool.y is None else pool.y[: args.batch]
    noise = torch.randn_like(x)
    advance = GraphedStep(pool._advance) if args.cuda_graphs else pool._advance

    def teacher_steps_ms() -> list[float]:
        for _ in range(warm):
            advance(x, s, y, noise)
        marks = [clock.mark()]
        for _ in range(n):
            advance(x, s, y, noise)
            marks.append(clock.mark())
        return clock.steps_ms(marks)

    common = {"teacher_params": teacher_params, "machine": _machine(device), "matmul_dtype": matmul_dtype,
              "matmul_tflops": matmul_tflops, "prep": None, "vendor_tflops": _vendor_peak(device),
              "teacher_flops": flops / args.batch}
    if args.scale == "digits":  # (d) preparation throughput, exact and sampled
        rates = []
        for prep in ("exact", "sampled"):
            p = KnowledgePool(teacher, args.batch, "dynamic", rho=args.rho, seed=1, device=device, preparation=prep)
            start = clock.mark()
            p.prepare(chunk=args.prep_batch)
            rates.append(p.prep_calls / (clock.ms(start, clock.mark()) / 1000))
        common["prep"] = tuple(rates)
    # the fixed batch of (u): a pool batch, copied out of the pool's tensors
    b = pool.next_batch()
    target = b.target
    fixed = TrainingBatch(x_t=b.x_t.clone(), t=b.t.clone(), y=None if b.y is None else b.y.clone(),
                          target=Reverse(target.eps.clone(), target.x0.clone(), target.mean.clone(), None,
                                         target.log_variance.clone()))
    data = builtin_dataset("digits") if args.scale == "digits" else RandomImages(teacher.sample_shape, device)

    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in args.student_specs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            built = []

            def trainer_for(out, spec=spec, built=built):
                def make(source):
                    torch.manual_seed(0)
                    student = DiffusionModel.build(spec, teacher.sample_shape, teacher.schedule, clip_x0=teacher.clip_x0)
                    if not built:
                        built.append(count_parameters(student.net))
                        built.extend(f / args.batch for f in _student_flops(student.to(device), args.batch, device))
                    cfg = TrainConfig(steps=1, lr=1e-4, ema_decay=0.9999, ckpt_every=10 ** 9,
                                      mixed_precision=args.mixed_precision, compile=args.compile,
                                      channels_last=args.channels_last, cuda_graphs=args.cuda_graphs)
                    return Trainer(student, source, cfg, out, progress=False, accelerator=acc)
                return make

            def loop_ms(source, sub):
                ms = _loop_ms(trainer_for(Path(tmp) / name / sub), source, clock, warm, n)
                acc.free_memory()  # the Accelerator would otherwise keep every trainer's model and optimizer
                return ms

            # rounds of (b), (u), (c), (a) one after the other, so that a change in what else runs on
            # the machine falls on all four alike; each is the median of its steps over the rounds
            steps = {"b": [], "u": [], "c": [], "a": []}
            for r in range(args.rounds):
                steps["b"] += teacher_steps_ms()
                steps["u"] += loop_ms(FixedSource(fixed, pool.schedule, pool.num_classes), f"update{r}")
                steps["c"] += loop_ms(pool, f"dkdm{r}")
                steps["a"] += loop_ms(DataSource(data, teacher.schedule, args.batch, seed=r, device=device), f"data{r}")
            ms = {k: statistics.median(v) for k, v in steps.items()}
            report({**common, "student": name if args.scale != "digits" else spec, "student_params": built[0],
                    "teacher_ms": ms["b"], "update_ms": ms["u"], "dkdm_ms": ms["c"], "data_ms": ms["a"],
                    "teacher_tflops": flops / (ms["b"] / 1000) / 1e12,
                    "ratio": ms["c"] / (ms["b"] + ms["u"]), "ratio_data": ms["c"] / (ms["a"] + ms["b"]),
                    "samples_per_s": 1000 * args.batch / ms["c"], "peak_mib": _peak_mib(device),
                    "student_flops": built[1], "update_flops": built[2],
                    "update_tflops": built[2] * args.batch / (ms["u"] / 1000) / 1e12})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["digits", *SCALES], default="digits")
    ap.add_argument("--tiny", action="store_true", help="the scale's code path with toy networks and batch (CPU tests)")
    ap.add_argument("--teacher", default="builtin:digits", help="teacher of the digits scale")
    ap.add_argument("--student", help="one student spec (digits scale; default: the default digits student)")
    ap.add_argument("--students", default="adm,unet,dit", help="which of a scale's students, comma-separated")
    ap.add_argument("--batch", type=int, help="batch size (default: 64 for digits, 128 at the scales)")
    ap.add_argument("--steps", type=int, default=50, help="steps timed per measurement (over all rounds)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first, each round (CUDA graphs capture after 3)")
    ap.add_argument("--rounds", type=int, help="rounds of the four measurements (default: 3 on a CPU shared with "
                                               "other work, 1 on a GPU)")
    ap.add_argument("--rho", type=float, default=0.005, help="pool size")
    ap.add_argument("--prep-batch", type=int, help="teacher batch of preparation (default: the pool's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--teacher-autocast", choices=["no", "bf16", "fp16"], default="no",
                    help="run the teacher's network under autocast (reduced precision for any network kind)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="the student's")
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher and the student")
    ap.add_argument("--channels-last", action="store_true", help="channels-last teacher and student")
    ap.add_argument("--cuda-graphs", action="store_true", help="student update and teacher step as CUDA graphs")
    ap.add_argument("--no-record", action="store_true", help="do not add rows to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        ap.error("--cuda-graphs needs --device cuda")
    args.rounds = args.rounds or (1 if args.device == "cuda" else 3)
    if args.scale == "digits":
        args.student_specs = [("student", args.student or DIGITS_STUDENT)]
        args.batch = args.batch or 64
    else:
        specs = (TINY if args.tiny else SCALES[args.scale])["students"]
        names = [s.strip() for s in args.students.split(",") if s.strip()]
        unknown = set(names) - set(specs)
        if unknown:
            ap.error(f"unknown student(s) {', '.join(sorted(unknown))}; choose from {', '.join(specs)}")
        args.student_specs = [(s, specs[s]) for s in names]
        args.batch = args.batch or (TINY["batch"] if args.tiny else SCALES[args.scale]["batch"])

    def report(r):
        share = r["teacher_tflops"] / r["matmul_tflops"]
        print(f"[{args.scale} | {r['student']} {r['student_params'] / 1e6:.1f}M | B {args.batch} | {_settings(args)}] "
              f"(b) teacher step {r['teacher_ms']:.2f} ms | (u) student update {r['update_ms']:.2f} ms | (c) DKDM step "
              f"{r['dkdm_ms']:.2f} ms | (c)/((b)+(u)) = {r['ratio']:.3f} | (a) data step {r['data_ms']:.2f} ms | "
              f"(c)/((a)+(b)) = {r['ratio_data']:.3f} | {r['samples_per_s']:,.0f} samples/s | teacher "
              f"{r['teacher_tflops']:.3f} TFLOP/s = {share:.1%} of {r['matmul_tflops']:.1f} ({r['matmul_dtype']} matmul) | "
              f"peak {r['peak_mib']:.0f} MiB | {r['machine']}", flush=True)
        peak = r["vendor_tflops"]
        vendor = (lambda rate: f" = {rate / peak:.1%} of the vendor's {peak:.0f} dense bf16") if peak else (lambda rate: "")
        print(f"(f) FLOPs per sample: teacher forward {r['teacher_flops'] / 1e9:.3f} G, student forward "
              f"{r['student_flops'] / 1e9:.3f} G, student update {r['update_flops'] / 1e9:.3f} G | teacher "
              f"{r['teacher_tflops']:.3f} TFLOP/s = {share:.1%} of measured matmul{vendor(r['teacher_tflops'])} | student "
              f"update {r['update_tflops']:.3f} TFLOP/s = {r['update_tflops'] / r['matmul_tflops']:.1%} of measured "
              f"matmul{vendor(r['update_tflops'])}", flush=True)
        if r["prep"]:
            print(f"(d) preparation: exact {r['prep'][0]:,.0f} teacher sample-steps/s, sampled {r['prep'][1]:,.0f}/s",
                  flush=True)
        if args.no_record:
            return
        prep = f"{r['prep'][0]:,.0f} / {r['prep'][1]:,.0f}" if r["prep"] else "-"
        row = (f"| {time.strftime('%Y-%m-%d')} | {r['machine']} | {args.scale} | {r['teacher_params'] / 1e6:.1f}M | "
               f"{r['student']} ({r['student_params'] / 1e6:.1f}M) | {args.batch} | {_settings(args)} | "
               f"{r['teacher_ms']:.2f} | {r['update_ms']:.2f} | {r['dkdm_ms']:.2f} | {r['ratio']:.3f} | {r['data_ms']:.2f} | "
               f"{r['ratio_data']:.3f} | {r['samples_per_s']:,.0f} | {r['teacher_tflops']:.3f} ({share:.1%}) | "
               f"{r['peak_mib']:.0f} | {prep} |")
        add_row(HERE / "RESULTS.md", TABLE, row, "## Per-step cost by scale (`bench/speed.py`, issue 14)")
        of_peak = [f"{rate / peak:.1%}" if peak else "-" for rate in (r["teacher_tflops"], r["update_tflops"])]
        flops_row = (f"| {time.strftime('%Y-%m-%d')} | {r['machine']} | {args.scale} | {r['student']} | {_settings(args)} | "
                     f"{r['teacher_flops'] / 1e9:.3f} | {r['student_flops'] / 1e9:.3f} | {r['update_flops'] / 1e9:.3f} | "
                     f"{share:.1%} | {r['update_tflops'] / r['matmul_tflops']:.1%} | {of_peak[0]} | {of_peak[1]} |")
        add_row(HERE / "RESULTS.md", FLOPS_TABLE, flops_row, "## FLOPs per sample and MFU (`bench/speed.py`, issue 29)")

    measure(args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
