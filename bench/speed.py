"""Where the time of a DKDM step goes, measured in one run (never a timed unit test).

For a teacher, a student and a batch size it measures, in the same process:
  (a) a data-based training step of the student (the Trainer's loop on real data),
  (b) one teacher reverse step of a batch (what the pool adds per training step),
  (c) a DKDM step (the Trainer's loop on a dynamic pool),
  (d) pool preparation throughput in teacher sample-steps per second (exact and sampled),
  (e) peak memory,
  (f) the teacher's arithmetic rate (FLOPs of its forward / its step time) against the device's
      measured matmul rate (bf16 on a GPU, float32 on a CPU): how far the teacher is from the roof,
and prints the ratio (c) / ((a) + (b)): 1.0 means distillation costs exactly a data-based step
plus the teacher's forward, nothing more. A row per run is appended to bench/RESULTS.md.

    python bench/speed.py                                   # digits teacher, default student
    python bench/speed.py --device cuda --teacher-dtype bfloat16 --compile --channels-last
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _loop_rate(trainer) -> float:
    """Steps per second of the Trainer's loop (its own clock, start-up and the final save excluded)."""
    trainer.train()
    import json

    lines = (trainer.out / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["steps_per_s"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _forward_flops(teacher, batch, device) -> float:
    """FLOPs of one teacher forward of a batch, counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *teacher.sample_shape, device=device)
    t = torch.full((batch,), teacher.schedule.num_steps // 2, device=device)
    y = teacher.labels_for(batch, None, device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        teacher(x, t, y)
    return float(counter.get_total_flops())


def _matmul_rate(device) -> tuple[str, float]:
    """The device's measured dense matmul rate in TFLOP/s: the roof the teacher is compared with."""
    gpu = device.type == "cuda"
    dtype, n = (torch.bfloat16, 4096) if gpu else (torch.float32, 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return str(dtype).removeprefix("torch."), 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def measure(args) -> dict:
    from accelerate import Accelerator

    from dkdm.data import DataSource, builtin_dataset
    from dkdm.model import DiffusionModel, load_model
    from dkdm.pool import KnowledgePool
    from dkdm.trainer import TrainConfig, Trainer

    acc = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    device = acc.device
    teacher = load_model(args.teacher, device=device, role="teacher")
    teacher.requires_grad_(False)
    if args.teacher_dtype != "float32":
        teacher.set_inference_dtype(args.teacher_dtype)
    if args.channels_last:
        teacher.net.to(memory_format=torch.channels_last)
    flops = _forward_flops(teacher, args.batch, device)
    if args.compile:
        teacher.net = torch.compile(teacher.net)

    def student():
        torch.manual_seed(0)
        return DiffusionModel.build(args.student, teacher.sample_shape, teacher.schedule,
                                    clip_x0=teacher.clip_x0).to(device)

    cfg = TrainConfig(steps=args.steps, lr=1e-4, ema_decay=0.999, log_every=args.steps, ckpt_every=10 ** 9,
                      mixed_precision=args.mixed_precision, compile=args.compile, channels_last=args.channels_last)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = DataSource(builtin_dataset(teacher.extra.get("data") or "digits"), teacher.schedule, args.batch,
                          device=device)
        s = student()
        out["data_step_ms"] = 1000 / _loop_rate(Trainer(s, data, cfg, Path(tmp) / "a", progress=False, accelerator=acc))

        pool = KnowledgePool(teacher, args.batch, "dynamic", rho=args.rho, seed=0, device=device)
        pool.prepare(chunk=args.prep_batch)
        x = pool.x[: args.batch].float()
        sv = pool.s[: args.batch].clamp(min=1)
        for _ in range(3):
            pool._teacher_step(x, sv)
        _sync(device)
        t0 = time.perf_counter()
        n = max(10, args.steps // 2)
        for _ in range(n):
            pool._teacher_step(x, sv)
        _sync(device)
        out["teacher_step_ms"] = 1000 * (time.perf_counter() - t0) / n

        s = student()
        out["dkdm_step_ms"] = 1000 / _loop_rate(Trainer(s, pool, cfg, Path(tmp) / "c", progress=False, accelerator=acc))

        for prep in ("exact", "sampled"):
            p = KnowledgePool(teacher, args.batch, "dynamic", rho=args.rho, seed=1, device=device, preparation=prep)
            _sync(device)
            t0 = time.perf_counter()
            p.prepare(chunk=args.prep_batch)
            _sync(device)
            out[f"prep_{prep}_steps_per_s"] = p.prep_calls / (time.perf_counter() - t0)
            out[f"prep_{prep}_teacher_steps"] = p.prep_calls
    out["ratio"] = out["dkdm_step_ms"] / (out["data_step_ms"] + out["teacher_step_ms"])
    out["teacher_tflops"] = flops / (out["teacher_step_ms"] / 1000) / 1e12
    out["matmul_dtype"], out["matmul_tflops"] = _matmul_rate(device)
    if device.type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["machine"] = torch.cuda.get_device_name()
    else:
        out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--student", default="unet:widths=24-48,layers=1,groups=8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="training steps timed per loop")
    ap.add_argument("--rho", type=float, default=0.005, help="pool size for (c) and (d)")
    ap.add_argument("--prep-batch", type=int, help="teacher batch of preparation (default: the pool's, 256 on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher and the student")
    ap.add_argument("--channels-last", action="store_true", help="channels-last teacher and student")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    r = measure(args)
    print(f"(a) data-based step {r['data_step_ms']:.2f} ms | (b) teacher step {r['teacher_step_ms']:.2f} ms | "
          f"(c) DKDM step {r['dkdm_step_ms']:.2f} ms | ratio (c)/((a)+(b)) = {r['ratio']:.3f}")
    print(f"(d) preparation: exact {r['prep_exact_steps_per_s']:,.0f} teacher sample-steps/s, sampled "
          f"{r['prep_sampled_steps_per_s']:,.0f}/s ({r['prep_exact_teacher_steps'] / r['prep_sampled_teacher_steps']:.1f}x "
          f"fewer steps) | (e) peak memory {r['peak_mem_mib']:.0f} MiB | {r['machine']}")
    print(f"(f) teacher forward {r['teacher_tflops']:.3f} TFLOP/s against a measured {r['matmul_dtype']} matmul rate "
          f"of {r['matmul_tflops']:.3f} TFLOP/s ({r['teacher_tflops'] / r['matmul_tflops']:.1%})")
    if not args.no_record:
        path = HERE / "RESULTS.md"
        if not path.exists():
            path.write_text("# Benchmark results\n\n| date | machine | teacher | student | B | teacher dtype | "
                            "compile | channels-last | (a) data ms | (b) teacher ms | (c) DKDM ms | ratio | prep exact /s | "
                            "prep sampled /s | peak MiB | teacher TFLOP/s | matmul TFLOP/s |\n"
                            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        with open(path, "a") as f:
            f.write(f"| {time.strftime('%Y-%m-%d')} | {r['machine']} | {args.teacher} | {args.student} | {args.batch} | "
                    f"{args.teacher_dtype} | {'yes' if args.compile else 'no'} | {'yes' if args.channels_last else 'no'} | "
                    f"{r['data_step_ms']:.2f} | "
                    f"{r['teacher_step_ms']:.2f} | {r['dkdm_step_ms']:.2f} | {r['ratio']:.3f} | "
                    f"{r['prep_exact_steps_per_s']:,.0f} | {r['prep_sampled_steps_per_s']:,.0f} | {r['peak_mem_mib']:.0f} | "
                    f"{r['teacher_tflops']:.3f} | {r['matmul_tflops']:.3f} ({r['matmul_dtype']}) |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
