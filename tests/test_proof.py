"""Proof that distillation works: a toy2d teacher, distilled data-free into a differently shaped MLP.

The dynamic-pool student must come within 1.5x (+0.03) of the teacher's sliced W2 to the true
distribution; the iterative pool, at the same teacher budget, is recorded alongside. The fast
suite runs it at a size that proves the same in seconds (a shorter teacher and distillation, the
dynamic pool alone); the slow set at the full size.
"""

import json
import os
import time

import pytest

from dkdm.cli import main


def _evaluate(model, capsys, num=None):
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--no-progress", *(["--num", str(num)] if num else [])]) == 0
    return json.loads(capsys.readouterr().out)["sliced_w2"]


@pytest.mark.parametrize("teacher_steps, steps, iterative", [
    (600, 400, False), pytest.param(3000, 2500, True, marks=pytest.mark.slow)])
def test_dynamic_distillation_matches_teacher_on_toy2d(tmp_path, capsys, teacher_steps, steps, iterative):
    start = time.time()
    teacher = tmp_path / "teacher"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=128,depth=3", "--steps", str(teacher_steps),
                 "--seed", "0", "--out", str(teacher), "--no-progress", "--no-report"]) == 0
    common = ["--teacher", str(teacher), "--student", "mlp:width=96,depth=2", "--batch", "256",
              "--steps", str(steps), "--seed", "1", "--no-progress", "--no-report"]
    assert main(["distill", *common, "--pool", "dynamic", "--rho", "0.4", "--out", str(tmp_path / "dyn")]) == 0
    if iterative:
        assert main(["distill", *common, "--pool", "iterative", "--out", str(tmp_path / "it")]) == 0
    num = None if iterative else 2000  # the fast size scores half the reference's 4,000 samples
    w_teacher = _evaluate(teacher, capsys, num)
    w_dynamic = _evaluate(tmp_path / "dyn", capsys, num)
    w_iterative = _evaluate(tmp_path / "it", capsys) if iterative else None
    result = {"teacher": w_teacher, "dynamic": w_dynamic, "iterative": w_iterative,
              "seconds": round(time.time() - start, 1)}
    print("sliced W2:", json.dumps(result))
    if os.environ.get("DKDM_PROOF_OUT"):
        with open(os.environ["DKDM_PROOF_OUT"], "w") as f:
            json.dump(result, f)
    assert w_dynamic <= 1.5 * w_teacher + 0.03, result
    assert w_teacher < 0.15, result  # the teacher itself learned the ring of Gaussians
