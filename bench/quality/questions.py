"""The paper's open questions at digits scale (docs/questions.md): one resumable runner.

Each question is a set of rows; each row is a `dkdm distill` command (every setting by the rules,
plus the row's flags) run once per seed, scored by the run's own report (digits-FID, precision,
recall, density, coverage and class_tv of 1,437 samples at 100 steps, and the teacher's, for the
ratio). A finished run directory is reused and a stopped one resumed, so rerunning completes a
grid; `--jobs N` runs N at once (one thread each: on 2 cores two jobs beat one job of two threads).

    python bench/quality/questions.py --question objective --seeds 0 1 2 --out bench-runs/questions
    python bench/quality/questions.py --question families --seeds 0 1 2 --jobs 2
    python bench/quality/questions.py --render docs/questions.json     # tables and plots only

Questions:
  objective: the DKDM loss ablated (a learned-variance student): L*simple alone (lambda 0), the VLB
      term alone (its gradient reaching the mean, else it trains nothing but the variance), lambda
      in 0.01 / 0.1 / 1 (default) / 10, and lambda 1 without the stop-gradient on the mean.
  families: the default UNet student against a DiT, a U-ViT and a network named only by its import
      path (bench/quality/example_net.py), each at about the default student's size, no other flag
      (the family rule: 2.5x the UNet's budget, 3x its lr; 5x the budget for the U-ViT and the DiT,
      whose 2.5x rows stay as run); and each at the UNet's budget and lr.
  diversity: the default DKDM student beside the same network trained on the real digits with the
      same budget and optimizer (`dkdm train`): do density, coverage and the class histogram see a
      difference that FID does not?
  rho: the pool's size against the teacher: digits UNet teachers of about 0.23M, 0.92M (the bundled
      one) and 3.7M parameters, and the bundled architecture stopped early (1,500 steps: a weaker
      teacher), each distilled into its default student at rho 0.05 / 0.1 / 0.2 / 0.4 / 0.8.
  teacher_families: the teacher-family axis: a DiT teacher (bench/quality/teachers.py's) distilled into a
      DiT, a UNet, a U-ViT and the ConvMixer by import path, each with no other flag; and the same
      transformer trained twice as long (12,000 steps, its lr annealed: a teacher as good as the
      bundled UNet) distilled into the same four families; the DiT student at 3,000 steps (the 2.5x
      rule when they ran) and, for the stronger teacher, at 6,000 (the rule since).
  ceiling: DKDM at 1x / 2x / 4x the default budget, the same network trained on the real digits at
      the same budgets, and the data-free baseline (`dkdm synth` then `dkdm train`) on synthetic sets
      of 1x / 4x / 16x the real training set's 1,437 images, at the 4x budget.

Rows may name a teacher the runner trains first (``@teacher:NAME``, TEACHERS) and a synthetic set it
samples first (``@synthetic:N``, N per seed); `--dry-run` prints every command without running one.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("digits_fid", "precision", "recall", "density", "coverage", "class_tv")
DIT, UVIT = "--student=dit:width=96,heads=3", "--student=uvit:width=72,heads=3,depth=7"
CONVMIXER = "--student=example_net:ConvMixer:width=160,depth=8"
UNET_RULE = ["--steps", "1200", "--lr", "1e-3"]
#: digits step budgets of the non-convolutional families: 2.5x a UNet's (the rule until 2026-12-07 for the
#: DiT, 2026-12-05 for the U-ViT; rows run under it pin it so they rerun as recorded) and 5x (the rule since)
AT_2_5X, AT_5X = ["--steps", "3000"], ["--steps", "6000"]
QUESTIONS = {
    "objective": {
        "lambda 1 (default)": [],
        "L*simple alone (lambda 0)": ["--vlb-weight", "0"],
        "VLB alone (no stop-gradient)": ["--simple-weight", "0", "--vlb-mean-grad"],
        "lambda 0.01": ["--vlb-weight", "0.01"],
        "lambda 0.1": ["--vlb-weight", "0.1"],
        "lambda 10": ["--vlb-weight", "10"],
        "lambda 1, no stop-gradient": ["--vlb-mean-grad"],
    },
    "families": {
        "unet (default, 518k)": [],
        # run at the 2.5x rule of their day; the two families' 5x rule is the 6,000-step rows below
        "dit (826k), 3,000 steps (2.5x)": [DIT, *AT_2_5X],
        "uvit (517k), 3,000 steps (2.5x)": [UVIT, *AT_2_5X],
        "ConvMixer by import path (554k)": [CONVMIXER],
        # before the family rule (defaults.CONV_FAMILIES): every family at the UNet's budget and rate
        "dit (826k), a UNet's budget and lr": [DIT, *UNET_RULE],
        "uvit (517k), a UNet's budget and lr": [UVIT, *UNET_RULE],
        "ConvMixer (554k), a UNet's budget and lr": [CONVMIXER, *UNET_RULE],
        "dit (826k), a UNet's budget, lr 3e-3": [DIT, "--steps", "1200", "--lr", "3e-3"],
        "uvit (517k), a UNet's budget, lr 3e-3": [UVIT, "--steps", "1200", "--lr", "3e-3"],
        # the DiT at 5x a UNet's budget, its family rule since 2026-12-07 (the flag as it was run)
        "dit (826k), 6,000 steps": [DIT, *AT_5X],
        # the U-ViT at its family rule (5x, since 2026-12-05; its three seeds were first run by hand)
        "uvit (517k), 6,000 steps": [UVIT, *AT_5X],
    },
    "diversity": {
        "DKDM (default)": [],
        "data-based, same network and budget": ["train", "--data", "digits", "--model", "unet:widths=24-48,layers=2",
                                                "--steps", "1200", "--batch", "128", "--lr", "1e-3", "--warmup", "200",
                                                "--lr-decay", "cosine", "--grad-clip", "1", "--ema", "0.9999"],
    },
}


#: Teachers a row may name as @teacher:NAME, trained once by `dkdm train --data digits` (seed 0) with
#: the digits defaults and the flags given; "dit" is bench/quality/teachers.py's transformer teacher.
DIT_TEACHER = ("dit:patch=2,depth=4,width=128,heads=4", ["--lr", "1e-3", "--grad-clip", "0"])
TEACHERS = {"small": ("unet:widths=16-32,layers=2", 12000, []), "large": ("unet:widths=64-128,layers=2", 12000, []),
            "early": ("unet:widths=32-64,layers=2", 1500, []),
            "dit": (DIT_TEACHER[0], 6000, DIT_TEACHER[1]),
            # the lever on the teacher-family axis's 1.5x target: the same transformer trained twice as long
            "dit-long": (DIT_TEACHER[0], 12000, [*DIT_TEACHER[1], "--lr-decay", "cosine"])}
RHOS = (0.05, 0.1, 0.2, 0.4, 0.8)
RHO_TEACHERS = {"0.23M": "@teacher:small", "0.92M (bundled)": "builtin:digits", "3.7M": "@teacher:large",
                "0.92M at 1,500 steps (weaker)": "@teacher:early"}
QUESTIONS["rho"] = {f"teacher {name}, rho {rho:g}": ["--teacher", ref, "--rho", f"{rho:g}"]
                    for name, ref in RHO_TEACHERS.items() for rho in RHOS}
#: The teacher-family axis: each transformer teacher distilled into each student family, no flag but the
#: student (its default student is a DiT at half its width; its rows pin the 3,000 steps of the 2.5x rule
#: they ran at); compared with the UNet teacher's rows.
DIT_TEACHERS = {"DiT teacher": "@teacher:dit", "DiT teacher, 12,000 steps": "@teacher:dit-long"}
DIT_TEACHERS_STUDENTS = {"dit (its default student), 3,000 steps (2.5x)": AT_2_5X,
                         "unet (518k)": ["--student=unet:widths=24-48,layers=2"],
                         "uvit (517k)": [UVIT], "ConvMixer by import path (554k)": [CONVMIXER]}
QUESTIONS["teacher_families"] = {f"{teacher} -> {student}": ["--teacher", ref, *flags]
                                 for teacher, ref in DIT_TEACHERS.items()
                                 for student, flags in DIT_TEACHERS_STUDENTS.items()}
#: the lever on the one cell the stronger teacher left above 1.5x: its DiT student at twice the 2.5x
#: budget (6,000 steps, 5x a UNet's, the DiT rule since 2026-12-07; its loss was still falling at 3,000)
QUESTIONS["teacher_families"]["DiT teacher, 12,000 steps -> dit (its default student), 6,000 steps"] = [
    "--teacher", DIT_TEACHERS["DiT teacher, 12,000 steps"], *AT_5X]
DATA_BASED = QUESTIONS["diversity"]["data-based, same network and budget"]
QUESTIONS["ceiling"] = {
    **{f"DKDM, {k}x budget": [] if k == 1 else ["--steps", str(1200 * k)] for k in (1, 2, 4)},
    **{f"data-based, {k}x budget": [*DATA_BASED[:DATA_BASED.index("--steps")], "--steps", str(1200 * k),
                                     *DATA_BASED[DATA_BASED.index("--steps") + 2:]] for k in (1, 2, 4)},
    **{f"data-free baseline, synthetic {k}x, 4x budget": ["train", "--data", f"@synthetic:{1437 * k}",
                                                          *DATA_BASED[3:DATA_BASED.index("--steps")], "--steps", "4800",
                                                          *DATA_BASED[DATA_BASED.index("--steps") + 2:]]
       for k in (1, 4, 16)},
}


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-")


def run_dir(out: Path, question: str, row: str, seed: int) -> Path:
    """Where the runner keeps one row's run for ``seed``."""
    return out / question / f"{_slug(row)}-s{seed}"


def _env() -> dict:
    """A run's environment: one thread, and bench/quality importable (the example network)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def twins(question: str, row: str) -> list[tuple[str, str]]:
    """The rows of other questions whose command is this row's (the ceiling's 1x rows are the default
    DKDM student and the diversity question's data-based one): a run of one is a run of the other."""
    flags = QUESTIONS[question][row]
    return [(q, r) for q in QUESTIONS for r in QUESTIONS[q] if q != question and QUESTIONS[q][r] == flags]


def with_twins(results: list[dict]) -> list[dict]:
    """``results`` plus, for every (question, row, seed) it lacks, a twin row's result under its name."""
    have = {(r["question"], r["row"], r["seed"]) for r in results}
    added = []
    for r in results:
        for q, row in twins(r["question"], r["row"]) if r["row"] in QUESTIONS.get(r["question"], {}) else []:
            if (q, row, r["seed"]) not in have:
                have.add((q, row, r["seed"]))
                added.append({**r, "question": q, "row": row})
    return results + added


def _resolved(out: Path, flag: str, seed: int) -> str:
    """A row's @teacher:NAME / @synthetic:N as the directory the runner builds it in."""
    if flag.startswith("@teacher:"):
        return str(out / "teachers" / flag.split(":", 1)[1])
    if flag.startswith("@synthetic:"):
        return str(out / "synthetic" / f"{flag.split(':', 1)[1]}-s{seed}")
    return flag


def command_of(out: Path, question: str, row: str, seed: int) -> list[str]:
    """The dkdm command of one row's run (a row is distill's flags, or a train command)."""
    flags = [_resolved(out, f, seed) for f in QUESTIONS[question][row]]
    command = [] if flags[:1] == ["train"] else ["distill"]
    d = run_dir(out, question, row, seed)
    return [sys.executable, "-m", "dkdm.cli", *command, *flags, "--seed", str(seed), "--no-progress", "--out", str(d)]


def inputs_of(out: Path, todo) -> list[list[str]]:
    """The commands that build what the rows of ``todo`` name: teachers, then synthetic sets (the
    default teacher's samples, 100 steps each); those already built are left out."""
    commands = []
    for q, row, seed in todo:
        for flag in QUESTIONS[q][row]:
            target = Path(_resolved(out, flag, seed))
            if flag.startswith("@teacher:"):
                spec, steps, flags = TEACHERS[flag.split(":", 1)[1]]
                cmd = [sys.executable, "-m", "dkdm.cli", "train", "--data", "digits", "--model", spec, "--steps",
                       str(steps), *flags, "--seed", "0", "--no-progress", "--no-report", "--out", str(target)]
            elif flag.startswith("@synthetic:"):
                cmd = [sys.executable, "-m", "dkdm.cli", "synth", "--teacher", "builtin:digits", "--num",
                       flag.split(":", 1)[1], "--steps", "100", "--seed", str(seed), "--no-progress", "--out", str(target)]
            else:
                continue
            if not (target / "dkdm_model.json").exists() and not (target / "dataset.json").exists() \
                    and cmd not in commands:
                commands.append(cmd)
    return commands


def run(out: Path, question: str, row: str, seed: int) -> dict:
    """One row's run for ``seed`` (started, resumed or reused); its report's numbers and wall time."""
    d = run_dir(out, question, row, seed)
    if not (d / "metrics.json").exists():  # the same command already run for another question will do
        d = next((t for q, r in twins(question, row) if ((t := run_dir(out, q, r, seed)) / "metrics.json").exists()), d)
    if not (d / "metrics.json").exists():
        args = command_of(out, question, row, seed) + (["--resume"] if d.exists() else [])
        t0 = time.time()
        d.parent.mkdir(parents=True, exist_ok=True)
        with open(d.with_name(d.name + ".log"), "a") as log:  # stderr kept: why a run failed
            done = subprocess.run(args, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
        if done.returncode != 0:  # reported, and the grid goes on (rerunning resumes it)
            print(f"{d}: exit {done.returncode}, see {d.name}.log", file=sys.stderr)
            return None
        (d / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    m = json.loads((d / "metrics.json").read_text())
    wall = d / "wall_s.txt"
    teacher = m.get("teacher", {}).get("digits_fid")  # a data-based row has none
    return {"question": question, "row": row, "seed": seed, "teacher_fid": teacher,
            **{k: m.get("student", m.get("model", {})).get(k) for k in KEYS},
            "wall_s": float(wall.read_text()) if wall.exists() else None}


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def markdown(results: list[dict], question: str) -> str:
    """The question's table: mean ± sd over seeds; families add each row's digits-FID over the first
    row's (the UNet student) at the same seed, mean ± sd over the seeds both have (the 1.5x target)."""
    rows = [r for r in results if r["question"] == question]
    order = list(QUESTIONS.get(question, {}))  # the runner's order; rows it no longer has last
    names = sorted(dict.fromkeys(r["row"] for r in rows), key=lambda n: order.index(n) if n in order else len(order))
    first = {r["seed"]: r["digits_fid"] for r in rows if names and r["row"] == names[0]}
    extra = question == "families"
    lines = ["| row | seeds | digits-FID |" + (" / unet |" if extra else "") + " / teacher | precision | recall | "
             "density | coverage | class_tv |", "|---" * (9 + extra) + "|"]
    for row in names:
        rs = [r for r in rows if r["row"] == row]
        cells = [_mean_sd([r[k] for r in rs]) for k in KEYS]
        ratio = _mean_sd([r["digits_fid"] / r["teacher_fid"] if r["teacher_fid"] else None for r in rs])
        unet = f" {_mean_sd([r['digits_fid'] / first[r['seed']] for r in rs if r['seed'] in first])} |" if extra else ""
        lines.append(f"| {row} | {', '.join(str(s) for s in sorted(r['seed'] for r in rs))} | {cells[0]} |{unet} {ratio} | "
                     + " | ".join(cells[1:]) + " |")
    return "\n".join(lines)


def plot(results: list[dict], question: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["question"] == question]
    names = list(dict.fromkeys(r["row"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        ratios = [r["digits_fid"] / r["teacher_fid"] for r in rows if r["row"] == name and r["teacher_fid"]]
        if not ratios:
            continue
        ax.scatter(ratios, [i] * len(ratios), color="C0")
        ax.plot([statistics.mean(ratios)] * 2, [i - 0.3, i + 0.3], color="C1")
    ax.set_yticks(range(len(names)), names)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("student digits-FID / teacher's (each seed; bar: mean)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the x label runs past a narrow figure's edge
    plt.close(fig)


def plot_ceiling(results: list[dict], path: Path) -> None:
    """The ceiling against the budget: digits-FID and recall of DKDM and of the data-based student at
    1x / 2x / 4x the default budget (each seed a dot, the mean a line), the teacher's mean as a line;
    and the data-free baseline's digits-FID against its synthetic set's size (at the 4x budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["question"] == "ceiling"]
    fig, (fid, recall, synth) = plt.subplots(1, 3, figsize=(13, 4))
    for i, series in enumerate(("DKDM", "data-based")):
        for ax, key in ((fid, "digits_fid"), (recall, "recall")):
            at = {k: [r[key] for r in rows if r["row"] == f"{series}, {k}x budget" and r[key] is not None]
                  for k in (1, 2, 4)}
            ks = [k for k in at if at[k]]
            for k in ks:
                ax.scatter([k] * len(at[k]), at[k], color=f"C{i}", s=12)
            ax.plot(ks, [statistics.mean(at[k]) for k in ks], color=f"C{i}", label=series)
    sizes = {k: [r["digits_fid"] for r in rows if r["row"] == f"data-free baseline, synthetic {k}x, 4x budget"]
             for k in (1, 4, 16)}
    ks = [k for k in sizes if sizes[k]]
    for k in ks:
        synth.scatter([k] * len(sizes[k]), sizes[k], color="C2", s=12)
    synth.plot(ks, [statistics.mean(sizes[k]) for k in ks], color="C2", label="synthetic set, 4x budget")
    for i, row in enumerate(("DKDM, 1x budget", "data-based, 4x budget")):  # the two for scale
        at = [r["digits_fid"] for r in rows if r["row"] == row]
        if at:
            synth.axhline(statistics.mean(at), color=f"C{i}", lw=0.8, label=f"{row} (mean)")
    teacher = [r["teacher_fid"] for r in rows if r["teacher_fid"]]
    for ax in (fid, synth):
        if teacher:
            ax.axhline(statistics.mean(teacher), color="grey", ls="--", lw=0.8, label="teacher (mean)")
        ax.set_ylabel("digits-FID")
    for ax, label in ((fid, "budget (x the default 1,200 steps)"), (recall, "budget (x the default 1,200 steps)"),
                      (synth, "synthetic set (x the real 1,437 images)")):
        ax.set_xscale("log", base=2)
        ticks = (1, 4, 16) if ax is synth else (1, 2, 4)
        ax.set_xlim(*((0.7, 23) if ax is synth else (0.85, 4.7)))
        ax.set_xticks(ticks, [f"{k}x" for k in ticks])
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    recall.set_ylabel("recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(store: Path, results: list[dict]) -> list[dict]:
    """``results`` written into ``store`` over the same (question, row, seed), under a lock: two runners
    of one --out (two grids at once) each keep the other's rows."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = json.loads(store.read_text()) if store.exists() else []
        done = {(r["question"], r["row"], r["seed"]) for r in results}
        merged = [r for r in kept if (r["question"], r["row"], r["seed"]) not in done] + results
        store.write_text(json.dumps(merged, indent=1))
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--question", choices=list(QUESTIONS), action="append")
    ap.add_argument("--rows", nargs="+", help="only these rows (their names as in QUESTIONS)")
    ap.add_argument("--match", help="only the rows whose name contains this text (e.g. '3.7M')")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--out", default="bench-runs/questions")
    ap.add_argument("--render", metavar="JSON", help="only render a results JSON (docs/questions.json)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands (inputs first) and run none")
    a = ap.parse_args(argv)
    if a.render:
        results = with_twins(json.loads(Path(a.render).read_text()))
        for q in dict.fromkeys(r["question"] for r in results):
            print(f"## {q}\n\n{markdown(results, q)}\n")
            plot(results, q, Path(a.render).with_name(f"questions-{q}.png"))
        if any(r["question"] == "ceiling" for r in results):
            plot_ceiling(results, Path(a.render).with_name("questions-ceiling-budget.png"))
        return 0
    out = Path(a.out)
    todo = [(q, row, seed) for q in (a.question or list(QUESTIONS)) for row in QUESTIONS[q]
            if (not a.rows or row in a.rows) and (not a.match or a.match in row) for seed in a.seeds]
    inputs = inputs_of(out, todo)
    if a.dry_run:
        for cmd in inputs + [command_of(out, *job) for job in todo]:
            print(" ".join(cmd[2:]))
        return 0
    env = _env()
    with ThreadPoolExecutor(a.jobs) as pool:  # teachers and sets first, each once (a resumed train continues)
        list(pool.map(lambda cmd: subprocess.run(cmd + (["--resume"] if Path(cmd[-1]).exists() and "train" in cmd
                                                        else []), check=True, env=env,
                                                 stdout=subprocess.DEVNULL), inputs))
    store = out / "questions.json"

    def run_and_store(job) -> dict | None:  # each row kept as it finishes: a stopped runner loses none
        r = run(out, *job)
        if r is not None:
            merge_results(store, [r])
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        results = [r for r in pool.map(run_and_store, todo) if r is not None]
    merged = with_twins(merge_results(store, []))  # every row is in already: the store as it stands
    for q in dict.fromkeys(r["question"] for r in results):
        print(f"## {q}\n\n{markdown(merged, q)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
