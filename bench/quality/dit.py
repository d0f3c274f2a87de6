"""Cross-architecture at the digits default budget: DiT students beside the UNet student, trained on the
data and distilled, over seeds; writes docs/cross-architecture.md.

Rows, every student at the same steps, batch, EMA, warm-up and pool (grid.cross_flags):
UNet teacher (``builtin:digits``) -> UNet student (the digits default run); data-based DiT student;
UNet teacher -> DiT student; DiT teacher -> DiT student (with ``--dit-teacher``: a DiT trained on
digits, e.g. by ``bench/quality/teachers.py --only dit``); and the teachers' own scores. The DiT rows,
the runner and the scheduler are grid.py's, so runs resume the same way (a job with a result is skipped).

    python bench/quality/dit.py --dit-teacher runs/teachers/dit      # run what is missing, write the report
    python bench/quality/dit.py --only databased_dit_s0 unet2dit_v2_s0 # some jobs, in this order
    python bench/quality/dit.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import grid

UNET_TEACHER = "UNet teacher (builtin:digits, 918k)"
DIT_TEACHER = "DiT teacher (--dit-teacher)"
UNET2UNET = "UNet teacher -> UNet student (digits default, 367k)"
DATABASED = "data-based DiT student"
UNET2DIT = "UNet teacher -> DiT student"
DIT2DIT = "DiT teacher -> DiT student"
ROWS = [UNET_TEACHER, DIT_TEACHER, UNET2UNET, DATABASED, UNET2DIT, DIT2DIT]
#: issue 16's targets: (row, reference row, largest ratio of digits-FID)
TARGETS = [(UNET2DIT, UNET2UNET, 1.5), (DIT2DIT, UNET2UNET, 1.5), (UNET2DIT, DATABASED, 1.2), (DIT2DIT, DATABASED, 1.2)]


def jobs_for(root: Path, iters: int, seeds: list[int], dit_teacher: str | None) -> list[dict]:
    """Seed by seed: the DiT rows first, then the UNet student, then the teachers' evaluations."""
    jobs: list[dict] = []
    add = grid.job_adder(jobs, root, iters)
    curve = [iters // 3, 2 * iters // 3, iters]
    for s in seeds:
        grid.add_dit_students(add, root, iters, s, dit_teacher or "")
        if not dit_teacher:
            jobs.pop()  # DiT -> DiT needs a DiT teacher
        add(f"unet2unet_s{s}", "cross", UNET2UNET, s,
            [["distill", "--student", grid.STUDENT, *grid.cross_flags(iters, s), "--out", str(root / f"unet2unet_s{s}")]],
            evals=curve)
        add(f"teacher_s{s}", "cross", UNET_TEACHER, s, [], evals=("final",), model="builtin:digits")
        if dit_teacher:
            add(f"dit_teacher_s{s}", "cross", DIT_TEACHER, s, [], evals=("final",), model=dit_teacher,
                teacher=dit_teacher)
    return jobs


def report(root: Path, jobs: list[dict], iters: int) -> str:
    results = {j["name"]: json.loads(p.read_text()) for j in jobs if (p := root / "results" / f"{j['name']}.json").exists()}
    by_row: dict[str, dict[int, dict]] = {}
    for j in jobs:
        if j["name"] in results:
            by_row.setdefault(j["method"], {})[j["seed"]] = results[j["name"]]
    seeds = sorted({j["seed"] for j in jobs})

    def fid(row, seed, point=None):
        r = by_row.get(row, {}).get(seed)
        if r is None:
            return None
        ev = r["evals"].get(str(point)) if point else grid._final(r)
        return ev["digits_fid"] if ev else None

    ev = next((grid._final(r) for r in results.values() if r["evals"]), None)
    how = f"{ev['num_samples']:,} samples, {ev['sampling_steps']} steps" if ev else "no evaluation yet"
    lines = [f"## Cross-architecture at {iters} iterations (digits-FID, {how}; evaluation seed = run seed)",
             "", "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | precision | recall | "
             "wall per run |", "|---" * (len(seeds) + 5) + "|"]
    for row in ROWS:
        rs = by_row.get(row, {})
        finals = [grid._final(r) for r in rs.values()]
        walls: dict[str, list[float]] = {}  # by device: a CPU job has one thread, a GPU's are shared by all at once
        for r in rs.values():
            if r.get("commands"):
                walls.setdefault(r.get("device", "cpu"), []).append(r["wall_s"])
        lines.append(f"| {row} | " + " | ".join(f"{fid(row, s):.2f}" if fid(row, s) is not None else "-" for s in seeds)
                     + f" | {grid._ms([f['digits_fid'] for f in finals])} | {grid._ms([f['precision'] for f in finals], '{:.3f}')}"
                     f" | {grid._ms([f['recall'] for f in finals], '{:.3f}')} | "
                     + ("; ".join(f"{statistics.mean(w):.0f} s ({'CPU, 1 thread' if d == 'cpu' else d}, {len(w)})"
                                  for d, w in sorted(walls.items())) or "-") + " |")
    points = [iters // 3, 2 * iters // 3, iters]
    lines += ["", "digits-FID against iterations (mean over the seeds that have the point):", "",
              "| row | " + " | ".join(str(p) for p in points) + " |", "|---" * (len(points) + 1) + "|"]
    for row in (UNET2UNET, DATABASED, UNET2DIT, DIT2DIT):
        lines.append(f"| {row} | " + " | ".join(
            grid._ms([v for s in seeds if (v := fid(row, s, p)) is not None]) for p in points) + " |")
    lines += ["", "| digits-FID ratio | per seed | of the means | issue 16 target |", "|---|---|---|---|"]
    for a, b, t in TARGETS:
        paired = [(fid(a, s), fid(b, s)) for s in seeds if fid(a, s) is not None and fid(b, s) is not None]
        if not paired:
            continue
        per_seed = ", ".join(f"{x / y:.2f}" for x, y in paired)
        means = statistics.mean(x for x, _ in paired) / statistics.mean(y for _, y in paired)
        lines.append(f"| {a} / {b} | {per_seed} | {means:.2f} ({len(paired)} seed{'s' * (len(paired) > 1)}) | <= {t} |")
    lines += ["", "Commands (seed 0; other seeds change --seed and the run directory):", ""]
    rel = str(root) + "/"
    shown = os.path.relpath(root, grid.REPO) + "/"
    for j in jobs:
        if j["seed"] == 0 and j["cmds"]:
            lines += [f"- {j['method']}: `dkdm {' '.join(c).replace(rel, shown)}`" for c in j["cmds"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=6000, help="training iterations of every student (the digits default)")
    ap.add_argument("--dit-teacher", help="a DiT digits teacher (a dkdm model directory); without it no DiT -> DiT row")
    grid.add_common_args(ap, grid.REPO / "runs" / "quality-dit", grid.REPO / "docs" / "cross-architecture.md", [0, 1, 2])
    a = ap.parse_args(argv)
    grid.EVAL_NUM, grid.EVAL_STEPS = a.eval_num, a.eval_steps
    root = Path(a.root).resolve()
    dit_teacher = str(Path(a.dit_teacher).resolve()) if a.dit_teacher else None
    jobs = jobs_for(root, a.iters, a.seeds, dit_teacher)
    if grid.run_jobs(ap, a, root, jobs, __file__, ["--dit-teacher", dit_teacher] if dit_teacher else []):
        return 0
    text = ("# Digits: DiT students beside the UNet student\n\n"
            f"Generated by `python bench/quality/dit.py` ({sum((root / 'results' / (j['name'] + '.json')).exists() for j in jobs)}"
            f" of {len(jobs)} jobs finished). Analysis: bench/quality/analysis.md, cross-architecture. "
            "A job runs on a CPU with one thread, or on a GPU with the other missing jobs at once "
            "(bench/quality/gpu_cross.sh); it is evaluated where it ran, so a seed's noise differs between devices.\n\n"
            + report(root, jobs, a.iters))
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
