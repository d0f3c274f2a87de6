"""Few-step samplers on digits, data-free: the table of docs/few-step.md.

For each seed: the DKDM students (`dkdm distill`, the default half-width UNet and a DiT from the
UNet teacher), their few-step students (`dkdm fewstep` at K = 4 with the default objective: consistency for
the UNet, distribution matching for the DiT by the family rule; and the one- and two-step
distribution-matching generators of both, scored at their own K only), and the few-step student of the teacher's
own architecture started from the teacher's weights; then digits-FID, precision and recall
(1,437 samples) at K = 1, 2, 4, 8 for: the teacher with DDIM (clipping) and DPM-Solver++ 2M
(thresholding at 1), the DKDM student with DPM-Solver++, and each few-step student with its own
sampler. Every run is a run directory under --out: a finished one is reused, a stopped one resumed
(`--resume`), so the script continues where it was stopped. The teacher's 100-step row is the report's.
`--jobs N` trains N runs at once (the DKDM students of every seed first, then their few-step
students), one thread each: on a GPU the digits runs are launch-bound and share it well
(bench/quality/gpu_fewstep.sh runs the whole table in one device call).

    python bench/quality/fewstep.py --out bench-runs/fewstep --seeds 0 1 2
    python bench/quality/fewstep.py --out bench-runs/fewstep --seeds 0 1 2 --jobs 12   # on a GPU
    python bench/quality/fewstep.py --seeds 0 1 2 --runs fewstep-dit matching-dit matching2-dit  # the DiT's rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

KS = (1, 2, 4, 8)
RUNS = {  # name: (command, extra flags); {student} is the DKDM run the few-step stage starts from
    "dkdm-unet": ("distill", []),
    "fewstep-unet": ("fewstep", ["--student", "{dkdm-unet}"]),
    "dkdm-dit": ("distill", ["--student", "dit:width=96,heads=3"]),
    "fewstep-dit": ("fewstep", ["--student", "{dkdm-dit}"]),
    "fewstep-teacher": ("fewstep", ["--student", "builtin:digits"]),
    # distribution matching (the default for one and two steps): generators scored at their own K only
    "matching-unet": ("fewstep", ["--student", "{dkdm-unet}", "--sampler-steps", "1"]),
    "matching-dit": ("fewstep", ["--student", "{dkdm-dit}", "--sampler-steps", "1"]),
    "matching2-unet": ("fewstep", ["--student", "{dkdm-unet}", "--sampler-steps", "2"]),
    "matching2-dit": ("fewstep", ["--student", "{dkdm-dit}", "--sampler-steps", "2"]),
}


def run(out: Path, name: str, seed: int, threads: int) -> tuple[Path, float]:
    """The run directory of ``name`` for ``seed``, started, resumed or reused; its wall time (as
    recorded when it was trained; 0 if unknown, e.g. a run trained by an older version of this script)."""
    command, extra = RUNS[name]
    d = out / f"{name}-s{seed}"
    if (d / "dkdm_model.json").exists():
        wall = d / "wall_s.txt"
        return d, float(wall.read_text()) if wall.exists() else 0.0
    extra = [e.format(**{k: str(out / f"{k}-s{seed}") for k in RUNS}) for e in extra]
    args = [sys.executable, "-m", "dkdm.cli", command, *extra, "--seed", str(seed), "--no-report", "--out", str(d)]
    if d.exists():
        args.append("--resume")
    t0 = time.time()
    subprocess.run(args, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    (d / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")  # the wall of this call (a resumed run: its last part)
    return d, time.time() - t0


def train_all(out: Path, seeds, jobs: int, only=tuple(RUNS)) -> None:
    """Every run of ``only`` (and the DKDM students they start from) for ``seeds``, ``jobs`` at once with
    one thread each: the DKDM students, then the few-step students that start from them."""
    first = [name for name in needed(only) if RUNS[name][0] == "distill"]
    for names in (first, [n for n in RUNS if n not in first and n in only]):
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda job: run(out, *job, 1), [(n, s) for s in seeds for n in names]))


def stock(model, scheduler, steps: int, seed: int, num: int) -> torch.Tensor:
    """``num`` samples of a diffusion model with a diffusers scheduler (its epsilon channels)."""
    sched, g = scheduler(), torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    c = model.sample_shape[0]
    x = torch.randn(num, *model.sample_shape, generator=g) * sched.init_noise_sigma
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(model(x, torch.full((num,), int(t)))[:, :c], t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def needed(only) -> list[str]:
    """The runs ``only`` names and the DKDM students they start from, in RUNS' order."""
    starts = {e.strip("{}") for name in only for e in RUNS[name][1] if e.startswith("{")}
    return [name for name in RUNS if name in only or name in starts]


def rows(out: Path, seed: int, num: int, threads: int, only=tuple(RUNS)) -> list[dict]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from dkdm.formats import load_model
    from dkdm.metrics.digits import digits_metrics

    dirs, walls = {}, {}
    for name in needed(only):
        dirs[name], walls[name] = run(out, name, seed, threads)
    teacher = load_model("builtin:digits").eval()
    cfg = teacher.schedule.to_diffusers()
    ddim = lambda: DDIMScheduler(**cfg, clip_sample=True)
    dpm = lambda: DPMSolverMultistepScheduler(**cfg, thresholding=True, sample_max_value=1.0)
    found = []

    def add(label, sample, wall=None, ks=KS):
        for k in ks:
            m = digits_metrics(sample(k))
            found.append({"model": label, "K": k, "seed": seed, "digits_fid": m["digits_fid"],
                          "precision": m["precision"], "recall": m["recall"], "wall_s": wall})
            print(json.dumps(found[-1]), flush=True)

    add("teacher, DDIM", lambda k: stock(teacher, ddim, k, seed, num))
    add("teacher, DPM-Solver++", lambda k: stock(teacher, dpm, k, seed, num))
    for name in [n for n in ("dkdm-unet", "dkdm-dit") if n in dirs]:
        student = load_model(dirs[name]).eval()
        add(f"{name}, DPM-Solver++", lambda k: stock(student, dpm, k, seed, num), walls[name])
    for name in [n for n in ("fewstep-unet", "fewstep-teacher") if n in only]:
        few = load_model(dirs[name]).eval()
        add(name, lambda k: few.sample(num, k, torch.Generator().manual_seed(seed)).clamp(-1, 1), walls[name])
    # the DiT's 4-step student is a matching generator by the family rule: scored at its own K
    for name in [n for n in ("fewstep-dit", "matching-unet", "matching-dit", "matching2-unet", "matching2-dit")
                 if n in only]:
        gen = load_model(dirs[name]).eval()
        add(name, lambda k: gen.sample(num, k, torch.Generator().manual_seed(seed)).clamp(-1, 1), walls[name],
            (gen.sampler_steps,))
    return found


def markdown(table: list[dict]) -> str:
    """digits-FID by model and K: the mean over seeds with the seeds' range, and precision / recall (means)."""
    lines = ["| model | seeds | " + " | ".join(f"K={k}: FID (P / R)" for k in KS) + " |",
             "|---|---|" + "---|" * len(KS)]
    for label in dict.fromkeys(r["model"] for r in table):
        rows = [r for r in table if r["model"] == label]
        seeds = sorted({r["seed"] for r in rows})
        cells = []
        for k in KS:
            at = [r for r in rows if r["K"] == k]
            if not at:
                cells.append("")
                continue
            fid = [r["digits_fid"] for r in at]
            mean = lambda key: sum(r[key] for r in at) / len(at)
            spread = f" ({min(fid):.1f}-{max(fid):.1f})" if len(fid) > 1 else ""
            cells.append(f"{mean('digits_fid'):.1f}{spread} ({mean('precision'):.2f} / {mean('recall'):.2f})")
        lines.append(f"| {label} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path, teacher_fid: float) -> None:
    """digits-FID, precision and recall against K (log scale), one line per model (mean over seeds)."""
    import textwrap

    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, label in enumerate(dict.fromkeys(r["model"] for r in table)):
        for ax, key in zip(axes, ("digits_fid", "precision", "recall")):
            at = {k: [r[key] for r in table if r["model"] == label and r["K"] == k] for k in KS}
            ks = [k for k in KS if at[k]]
            ax.plot(ks, [sum(at[k]) / len(at[k]) for k in ks], marker="osD^v"[i // 10 % 5],  # colours repeat by ten
                    ls=("-", "--", ":")[i // 10 % 3], label="\n".join(textwrap.wrap(label, 80)))
    axes[0].axhline(teacher_fid, color="gray", ls="--", label="teacher, 100 steps")
    axes[0].set_yscale("log")
    for ax, key in zip(axes, ("digits-FID", "precision", "recall")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps K")
        ax.set_title(key)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend's whole labels, however long


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-runs/fewstep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--num", type=int, default=1437)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each (e.g. 12 on a GPU)")
    ap.add_argument("--teacher-fid", type=float, default=10.84,
                    help="the teacher's 100-step digits-FID drawn in the plot (the report's, mean of seeds 0-2)")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                    help="only these runs (and the DKDM students they start from), e.g. the DiT's: fewstep-dit "
                         "matching-dit matching2-dit")
    ap.add_argument("--render", metavar="JSON", help="only render a table JSON (docs/few-step.json) as markdown and a plot")
    a = ap.parse_args(argv)
    if a.render:
        table = json.loads(Path(a.render).read_text())
        print(markdown(table))
        plot(table, Path(a.render).with_suffix(".png"), a.teacher_fid)
        return 0
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.jobs > 1:
        train_all(out, a.seeds, a.jobs, a.runs)
    table = []
    for seed in a.seeds:
        table += rows(out, seed, a.num, a.threads, a.runs)
    (out / "fewstep.json").write_text(json.dumps(table, indent=1))
    print(markdown(table))
    plot(table, out / "fewstep.png", a.teacher_fid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
