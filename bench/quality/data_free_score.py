"""Does the data-free sample score track the real digits-FID over a distillation?

Scores every checkpoint of a digits distillation run (`dkdm distill --ckpt-every N --keep-checkpoints K`)
by its EMA weights:
- the real digits-FID (1,437 samples, 100 steps, against the test split: the report's metric);
- the data-free score as `--eval-every` computes it (1,000 samples of 25 steps against the
  teacher's samples from the same noise, teacher mid-block features at t = 0.1 T), at two
  sampling seeds (its noise), and variants of its feature space (t, layer, raw pixels);
- the held-out error (512 states prepared as the pool's, from their own noise);
- the data-based analogue of the data-free score: the Fréchet distance between the same student
  and teacher samples in the digits classifier's features (`digits_fd_to_teacher`).
Then prints the Pearson and Spearman correlations of each with the real digits-FID and with
`digits_fd_to_teacher`, over all checkpoints and over those from a given step on (where a
stopping rule decides).

    python bench/quality/data_free_score.py RUN_DIR results.json [--every 300] [--from-step 1000]
    python bench/quality/data_free_score.py RUN_DIR fids.json --at 1500,2700 --eval-seeds 0,1,2,3

The second form scores chosen checkpoints' real digits-FID at several evaluation seeds (its
noise between seeds is about +-1: a single seed cannot rank checkpoints a few percent apart).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (layer, t as a fraction of T)
    "mid_t0.1 (default)": ("unet.mid_block", 0.1),
    "mid_t0": ("unet.mid_block", 0.0),
    "mid_t0.02": ("unet.mid_block", 0.02),
    "mid_t0.05": ("unet.mid_block", 0.05),
    "mid_t0.2": ("unet.mid_block", 0.2),
    "mid_t0.4": ("unet.mid_block", 0.4),
    "down1_t0.1": ("unet.down_blocks.1", 0.1),
    "up0_t0.1": ("unet.up_blocks.0", 0.1),
}
NUM, STEPS = 1000, 25


def score_run(run: Path, out: Path, every: int, shard: tuple[int, int] = (0, 1)) -> dict:
    from dkdm.checkpoint import load_checkpoint, unflatten
    from dkdm.evaluation import evaluate_model, score
    from dkdm.metrics.digits import embed, load_classifier
    from dkdm.metrics.features import frechet_distance, mean_cov
    from dkdm.metrics.teacher_fd import TeacherFeatures
    from dkdm.formats import load_model
    from dkdm.monitor import HELDOUT_SEED, heldout_error
    from dkdm.pool import KnowledgePool

    settings = json.loads((run / "run.json").read_text())
    seed = int(settings["seed"])
    teacher = load_model(settings["teacher"])
    student, ckpts = student_at(run, teacher)
    feats = {k: TeacherFeatures(teacher, layer, t) for k, (layer, t) in VARIANTS.items()}
    feats["pixels"] = lambda x: x.flatten(1)
    classifier = load_classifier()
    feats["digits_fd_to_teacher"] = lambda x: embed(classifier, x)[0]
    ref = {}
    for s in (seed, seed + 1):
        tx = teacher.sample(NUM, STEPS, torch.Generator().manual_seed(s))
        ref[s] = {k: mean_cov(f(tx)) for k, f in feats.items()}
    pool = KnowledgePool(teacher, int(settings["batch"]), "dynamic", float(settings["rho"]),
                         preparation=settings["prep"], prep_steps=int(settings["prep_steps"]))
    heldout = pool.held_out(512, seed + HELDOUT_SEED)
    results = json.loads(out.read_text()) if out.exists() else {}
    chosen = [s for s in sorted(ckpts) if s and s % every == 0]
    for step in chosen[shard[0]::shard[1]]:
        r = results.get(str(step), {})
        if all(k in r for k in feats):
            continue
        t0 = time.time()
        tensors, _ = load_checkpoint(ckpts[step])
        student.net.load_state_dict(unflatten("ema", tensors))
        if "digits_fid" not in r:
            r["digits_fid"] = evaluate_model(student, run, "digits", num=1437, steps=100, seed=seed,
                                             progress=False)[0]["digits_fid"]
            r.update(heldout_error(student, heldout, 1.0))
        for s in (seed, seed + 1):
            sx = student.sample(NUM, STEPS, torch.Generator().manual_seed(s))
            tag = "" if s == seed else "@seed+1"
            r["digits_fid_1000x25" + tag] = score(sx, "digits")["digits_fid"]
            for k, f in feats.items():
                r[k + tag] = frechet_distance(*ref[s][k], *mean_cov(f(sx)))
        r["wall_s"] = round(time.time() - t0, 1)
        results[str(step)] = r
        out.write_text(json.dumps(results, indent=1))
        print(step, {k: round(v, 4) for k, v in r.items() if "q" not in k}, flush=True)
    return results


def student_at(run: Path, teacher):
    """The run's student architecture (from its checkpoints) and its checkpoints by step."""
    from dkdm.checkpoint import list_checkpoints
    from dkdm.model import DiffusionModel

    ckpts = {int(json.loads((c / "meta.json").read_text())["step"]): c for c in list_checkpoints(run / "checkpoints")}
    described = json.loads((ckpts[max(ckpts)] / "meta.json").read_text())["run"]["student"]
    student = DiffusionModel.build(described["spec"], teacher.sample_shape, teacher.schedule,
                                   variance=described["variance"], clip_x0=described["clip_x0"]).eval()
    return student, ckpts


def fid_over_seeds(run: Path, out: Path, steps: list[int], seeds: list[int]) -> None:
    """The report's digits-FID (1,437 samples, 100 steps) of chosen checkpoints at several evaluation seeds."""
    from statistics import mean, stdev

    from dkdm.checkpoint import load_checkpoint, unflatten
    from dkdm.evaluation import evaluate_model
    from dkdm.formats import load_model

    student, ckpts = student_at(run, load_model(json.loads((run / "run.json").read_text())["teacher"]))
    results = json.loads(out.read_text()) if out.exists() else {}
    for step in steps:
        student.net.load_state_dict(unflatten("ema", load_checkpoint(ckpts[step])[0]))
        for seed in seeds:
            key = f"{step}/{seed}"
            if key not in results:
                results[key] = evaluate_model(student, run, "digits", num=1437, steps=100, seed=seed,
                                              progress=False)[0]["digits_fid"]
                out.write_text(json.dumps(results, indent=1))
        fids = [results[f"{step}/{seed}"] for seed in seeds]
        print(f"step {step}: digits-FID {mean(fids):.2f} +- {stdev(fids):.2f} over evaluation seeds {seeds} "
              f"({', '.join(f'{f:.2f}' for f in fids)})")


def correlations(results: dict, from_step: int) -> None:
    from scipy.stats import pearsonr, spearmanr

    steps = sorted(int(s) for s in results)
    keys = [k for k in results[str(steps[0])] if k != "wall_s" and "_q" not in k]
    for target in ("digits_fid", "digits_fd_to_teacher"):
        for lo in (0, from_step):
            sel = [s for s in steps if s >= lo]
            fid = [results[str(s)][target] for s in sel]
            print(f"\nagainst {target}, checkpoints from step {lo}: {len(sel)} (steps {sel[0]}..{sel[-1]}), "
                  f"{target} {min(fid):.3g}..{max(fid):.3g}")
            print(f"{'score':32s} pearson spearman")
            for k in keys:
                if k != target:
                    v = [results[str(s)][k] for s in sel]
                    print(f"{k:32s} {pearsonr(v, fid)[0]:7.3f} {spearmanr(v, fid)[0]:8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--from-step", type=int, default=1000)
    ap.add_argument("--every", type=int, default=1, help="score only checkpoints at multiples of this step")
    ap.add_argument("--shard", default="0/1", help="i/n: score every n-th chosen checkpoint from the i-th (parallel "
                                               "processes, each with its own results file)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--at", help="checkpoint steps (a-b-c or a,b,c) whose digits-FID to take at --eval-seeds")
    ap.add_argument("--eval-seeds", default="0,1,2,3")
    a = ap.parse_args()
    if a.at:
        fid_over_seeds(a.run, a.out, [int(x) for x in a.at.replace("-", ",").split(",")],
                       [int(x) for x in a.eval_seeds.split(",")])
        return
    shard = tuple(int(x) for x in a.shard.split("/"))
    results = json.loads(a.out.read_text()) if a.report_only else score_run(a.run, a.out, a.every, shard)
    correlations(results, a.from_step)


if __name__ == "__main__":
    main()
