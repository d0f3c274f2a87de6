"""How precise one seed's ratio is: a model scored at several sampling seeds, against its teacher.

A run's report scores 1,437 samples drawn at the run's own seed, and issue 27's targets compare that
with the teacher's report at the same seed. Both numbers move with the sampling seed (on digits by
about 1.3 digits-FID for a 100-step teacher, up to 2.9 for a one-step generator), so this script
draws every model given (run or model directories: few-step students, DKDM students) and its
teacher at sampling seeds 0..N-1 and prints each model's scores, their mean and the ratio of the
means, the estimate the per-seed ratio is a noisy sample of. One thread.

    python bench/quality/fewstep_seeds.py RUN [RUN ...] --seeds 6 --json rows.jsonl
    python bench/quality/fewstep_seeds.py RUN --teacher-mean 10.01   # the teacher's six-seed mean, known
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def scores(model, seeds: int, steps: int | None) -> list[dict]:
    """Digits metrics of 1,437 samples of ``model`` at each sampling seed (its own K steps by default)."""
    from dkdm.evaluation import draw, score

    return [score(draw(model, 1437, steps, seed, progress=False), "digits") for seed in range(seeds)]


def main(argv=None) -> int:
    from dkdm.errors import DkdmError
    from dkdm.formats import load_model
    from dkdm.rundir import recorded_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--seeds", type=int, default=6, help="sampling seeds 0..N-1")
    ap.add_argument("--teacher-steps", type=int, default=100, help="the teacher's sampling steps (the report's)")
    ap.add_argument("--json", help="append one line per model and seed to this file")
    ap.add_argument("--teacher-mean", type=float,
                    help="the teacher's mean digits-FID over the same seeds, measured before: the teacher is not drawn")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:  # every model readable before any is drawn: a missing run is one line, not a traceback
        models = {run: load_model(run).eval() for run in a.runs}
    except DkdmError as e:
        ap.error(str(e))
    refs = [(run, recorded_teacher(run) or "builtin:digits") for run in a.runs]
    distinct = {ref for _, ref in refs}
    if a.teacher_mean is not None and len(distinct) > 1:
        ap.error(f"--teacher-mean is one teacher's: these runs have {len(distinct)} teachers")
    teachers = {ref: [a.teacher_mean] for ref in distinct} if a.teacher_mean is not None else {}
    for run, ref in refs:
        if ref not in teachers:
            teachers[ref] = [m["digits_fid"] for m in scores(load_model(ref).eval(), a.seeds, a.teacher_steps)]
            print(f"teacher {ref}: {' / '.join(f'{f:.2f}' for f in teachers[ref])}, mean "
                  f"{statistics.mean(teachers[ref]):.2f}", flush=True)
        rows = scores(models[run], a.seeds, None)
        fids = [m["digits_fid"] for m in rows]
        ratio = statistics.mean(fids) / statistics.mean(teachers[ref])
        print(f"{run}: {' / '.join(f'{f:.2f}' for f in fids)}, mean {statistics.mean(fids):.2f} "
              f"(sd {statistics.stdev(fids):.2f}), ratio of the means {ratio:.2f}x", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                for seed, m in enumerate(rows):
                    f.write(json.dumps({"run": run, "seed": seed, "teacher": ref,
                                        **{k: m[k] for k in ("digits_fid", "precision", "recall")}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
