"""Watching a distillation without data: the held-out error, the data-free sample score,
--eval-every, --steps auto and the report every distillation writes."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dkdm.cli import main
from dkdm.monitor import MONITOR_FILE, Plateau, read_log
from helpers import same, weights


def toy_argv(teacher, out, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "mlp:width=32,depth=1", "--batch", "64", "--rho", "0.1",
            "--log-every", "25", "--ckpt-every", "50", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "teacher"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=32,depth=2", "--steps", "400", "--batch", "128",
                 "--no-progress", "--no-report", "--out", str(out)]) == 0
    return out


def evals(out):
    return [r for r in read_log(out / "log.jsonl") if r.get("kind") == "eval"]


def test_held_out_error_and_data_free_score_fall_and_watching_changes_no_weight(tmp_path, toy_teacher):
    assert main(toy_argv(toy_teacher, tmp_path / "watched", "--steps", "300", "--eval-every", "50",
                         "--monitor-num", "500")) == 0
    assert main(toy_argv(toy_teacher, tmp_path / "plain", "--steps", "300", "--no-report")) == 0
    same(weights(tmp_path / "watched"), weights(tmp_path / "plain"))
    rec = evals(tmp_path / "watched")
    assert [r["step"] for r in rec] == [50, 100, 150, 200, 250, 300]
    first, last = rec[0], rec[-1]
    assert last["heldout_mse"] < 0.3 * first["heldout_mse"], (first, last)
    assert last["heldout_vb"] < first["heldout_vb"]
    assert last["teacher_fd"] < 0.3 * first["teacher_fd"], (first, last)
    assert all(math.isfinite(r[f"heldout_mse_q{i}"]) for r in rec for i in range(4))
    assert "sliced_w2" in last and last["eval_s"] > 0
    assert len({r["teacher_fd_floor"] for r in rec}) == 1 and last["teacher_fd_floor"] > 0
    # the held-out states are spread over t and are not the pool's (their own noise)
    held = load_file(str(tmp_path / "watched" / MONITOR_FILE))
    assert len(held["t"]) == 512 and set((held["t"] * 4 // 100).tolist()) == {0, 1, 2, 3}
    pool = load_file(str(sorted((tmp_path / "watched" / "checkpoints").iterdir())[0] / "state.safetensors"))["source.x"]
    assert torch.cdist(held["x_t"], pool).min() > 0
    assert (tmp_path / "watched" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "watched" / "metrics.json").read_text())
    assert metrics["student vs teacher"]["heldout_mse"] == last["heldout_mse"]


def test_steps_auto_stops_on_a_plateau_and_resumes_to_the_same_stop(tmp_path, toy_teacher, capsys):
    # lr 1e-7: the student cannot improve, so both scores stall from the first evaluation on
    auto = ["--steps", "auto", "--eval-every", "50", "--patience", "2", "--lr", "1e-7", "--monitor-num", "100",
            "--no-report"]
    assert main(toy_argv(toy_teacher, tmp_path / "a", *auto, "--max-steps", "600")) == 0
    err = capsys.readouterr().err
    stop = json.loads((tmp_path / "a" / "stop.json").read_text())
    assert stop["step"] == 150 and stop["reason"].startswith("plateau") and "stopped at step 150: plateau" in err
    assert read_log(tmp_path / "a" / "log.jsonl")[-1]["step"] == 150
    # the same run cut at 100 steps, then resumed: the rule is replayed from the log and stops at the same step
    assert main(toy_argv(toy_teacher, tmp_path / "b", *auto, "--max-steps", "100")) == 0
    assert "reached the maximum of 100 steps" in json.loads((tmp_path / "b" / "stop.json").read_text())["reason"]
    assert main(toy_argv(toy_teacher, tmp_path / "b", *auto, "--max-steps", "600", "--resume")) == 0
    assert json.loads((tmp_path / "b" / "stop.json").read_text()) == stop
    assert evals(tmp_path / "a") == [{**r, "eval_s": a["eval_s"]} for r, a in zip(evals(tmp_path / "b"), evals(tmp_path / "a"))]
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # resuming a run that already stopped trains no further
    assert main(toy_argv(toy_teacher, tmp_path / "a", *auto, "--max-steps", "600", "--resume")) == 0
    assert [r["step"] for r in evals(tmp_path / "a")] == [50, 100, 150]
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # other evaluation settings cannot continue the run's scores
    capsys.readouterr()
    assert main(toy_argv(toy_teacher, tmp_path / "a", *auto, "--max-steps", "600", "--monitor-num", "200",
                         "--resume")) == 2
    err = capsys.readouterr().err
    assert "settings differ from the run" in err and "--monitor-num 200 (saved" in err, err  # its run.json


def test_plateau_rule_on_a_fake_score_sequence():
    heldout = [1.0, 0.5, 0.45, 0.449, 0.448, 0.447, 0.446]
    fd = [10.0, 8.0, 7.99, 6.0, 5.99, 5.98, 5.97]
    rule = Plateau(["heldout_loss", "teacher_fd"], patience=2, min_delta=0.01)
    stops = [rule.update(100 * (i + 1), {"heldout_loss": h, "teacher_fd": f}) for i, (h, f) in enumerate(zip(heldout, fd))]
    # held-out: last 1% gain at eval 3 (step 300); FD: last at eval 4 (step 400); both wait 2 evaluations by eval 6
    assert stops[:5] == [None] * 5
    assert stops[5] == ("plateau: no score improved by 1% in the last 2 evaluations "
                        "(best heldout_loss 0.45 at step 300, teacher_fd 6 at step 400)")
    # one score still improving keeps the run going; a score a record lacks is not watched
    rule = Plateau(["heldout_loss", "teacher_fd"], patience=2)
    assert all(rule.update(i, {"heldout_loss": 1.0, "teacher_fd": 10 * 0.9 ** i}) is None for i in range(20))
    rule = Plateau(["heldout_loss", "teacher_fd"], patience=2)
    assert [rule.update(i, {"heldout_loss": v}) is not None for i, v in enumerate([1.0, 1.0, math.nan])] == \
        [False, False, True]
    # a data-free score at or below its noise floor for `patience` evaluations in a row stops the run,
    # however fast the held-out error still falls
    rule = Plateau(["heldout_loss", "teacher_fd"], patience=2, floors={"teacher_fd": 0.2})
    fd = [0.5, 0.19, 0.25, 0.18, 0.2]
    stops = [rule.update(i, {"heldout_loss": 0.5 ** i, "teacher_fd": v}) for i, v in enumerate(fd)]
    assert stops[:4] == [None] * 4 and stops[4].startswith("teacher_fd 0.2 has stayed at or below its noise floor 0.2")


def test_trainer_callbacks_run_when_due_and_can_stop_the_run(tmp_path):
    from helpers import tiny_teacher

    from dkdm.checkpoint import list_checkpoints
    from dkdm.pool import KnowledgePool
    from dkdm.trainer import TrainConfig, Trainer

    teacher = tiny_teacher()
    calls = []

    class Every3:
        every = 3

        def __init__(self, stop_at):
            self.stop_at = stop_at

        def __call__(self, step, ema):
            calls.append((step, sorted(ema) == sorted(student.net.state_dict())))
            return "enough" if step == self.stop_at else None

    for stop_at, expected in ((None, [3, 6, 7]), (6, [3, 6])):
        calls.clear()
        pool = KnowledgePool(teacher, batch_size=16, rho=1.0, seed=0)
        pool.prepare()
        student = tiny_teacher(seed=1, spec="mlp:width=16,depth=1").train()
        out = tmp_path / f"run{stop_at}"
        trainer = Trainer(student, pool, TrainConfig(steps=7, ckpt_every=100, lr=1e-3), out, progress=False,
                          callbacks=[Every3(stop_at)])
        trainer.train()
        assert [s for s, _ in calls] == expected and all(ok for _, ok in calls)
        assert trainer.step == expected[-1] and trainer.stop_reason == ("enough" if stop_at else None)
        assert list_checkpoints(out / "checkpoints")[-1].name == f"step_{expected[-1]:08d}"
        assert (out / "model.safetensors").exists()


def test_teacher_features_are_the_mlp_hidden_layer_and_the_score_the_float64_frechet_distance():
    import scipy.linalg
    from helpers import tiny_teacher

    from dkdm.evaluation import data_free_score, draw, teacher_statistics
    from dkdm.metrics.teacher_fd import NOISE_SEED, TeacherFeatures

    teacher = tiny_teacher(steps=20, spec="mlp:width=16,depth=2")
    student = tiny_teacher(steps=20, seed=3, spec="mlp:width=16,depth=2")
    feats = TeacherFeatures(teacher)
    assert feats.layer == "out" and feats.t == 2  # round(0.1 * 19)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))

    def hidden(net, x0):  # the MLP's last hidden layer on x0 noised to t with the fixed noise, in float64
        net = net.double()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED)).double()
        t = torch.full((len(x0),), 2)
        x = teacher.schedule.q_sample(x0.double(), t, noise)
        from dkdm.nets.embedding import timestep_embedding

        h = net.inp(x) + net.time(timestep_embedding(t, net.temb).double())
        for block in net.blocks:
            h = h + block(h)
        net.float()
        return h.detach()

    torch.testing.assert_close(feats(x0), hidden(teacher.net, x0), rtol=1e-5, atol=1e-5)
    stats = teacher_statistics(teacher, 400, 10, seed=5, cache=False)
    t_samples = draw(teacher, 400, 10, 5, progress=False)
    s_samples = draw(student, 400, 10, 5, progress=False)
    a, b = hidden(teacher.net, t_samples).numpy(), hidden(teacher.net, s_samples).numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert data_free_score(teacher, s_samples, stats) == pytest.approx(ref, rel=1e-4)
    assert ref > 0.01
    # a student that samples like its teacher scores 0: same noise, same samples, no finite-sample floor
    assert abs(data_free_score(teacher, t_samples, stats)) < 1e-6 * ref


def test_teacher_features_of_unet_dit_and_a_respaced_teacher():
    from dkdm.diffusion import Schedule
    from dkdm.metrics.teacher_fd import TeacherFeatures
    from dkdm.model import DiffusionModel

    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    sched = Schedule.named("cosine", 20)
    unet = DiffusionModel.build("unet:widths=8-16,groups=4", (1, 8, 8), sched).eval()
    dit = DiffusionModel.build("dit:patch=2,depth=2,width=16,heads=2", (1, 8, 8), sched).eval()
    fu, fd = TeacherFeatures(unet), TeacherFeatures(dit)
    assert (fu.layer, fu(x).shape) == ("unet.mid_block", (5, 16))
    assert (fd.layer, fd(x).shape) == ("dit.transformer_blocks.1", (5, 16))
    # a respaced view of the teacher takes its features at the same original step (t = 2 of 20)
    torch.testing.assert_close(TeacherFeatures(unet.respaced(10))(x), fu(x))


def _digits_shaped_pipeline(path, steps=20):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=steps, beta_schedule="linear", variance_type="fixed_small",
                          clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)


def test_every_distillation_reports_student_against_teacher_even_for_a_plain_diffusers_teacher(tmp_path, capsys):
    from PIL import Image

    _digits_shaped_pipeline(tmp_path / "pipe")
    base = ["distill", "--teacher", str(tmp_path / "pipe"), "--student", "unet:widths=8-16,groups=4", "--steps", "5",
            "--batch", "8", "--rho", "0.5", "--eval-num", "40", "--eval-steps", "5", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(metrics) == {"student vs teacher"}
    row = metrics["student vs teacher"]
    assert math.isfinite(row["teacher_fd"]) and row["teacher_fd"] > 0 and row["num_samples"] == 40
    img = Image.open(tmp_path / "a" / "samples.png")
    assert img.width > 2 * img.height - 40  # two 8 x 8 grids side by side under their titles
    assert "| student vs teacher |" in capsys.readouterr().out
    # told which data set the teacher learned, the report adds that data set's metrics
    assert main([*base, "--reference", "digits", "--out", str(tmp_path / "b")]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student", "real train split", "student vs teacher"}
    assert metrics["student"]["num_samples"] == 40
    assert json.loads((tmp_path / "b" / "dkdm_model.json").read_text())["data"] == "digits"


@pytest.mark.parametrize("argv, msg", [
    (["train", "--data", "toy2d", "--steps", "auto"], "--steps auto needs a teacher"),
    (["distill", "--teacher", "{t}", "--steps", "5", "--max-steps", "10"], "--max-steps goes with --steps auto"),
    (["distill", "--teacher", "{t}", "--steps", "5", "--patience", "2"], "--patience goes with --steps auto"),
    (["distill", "--teacher", "{t}", "--steps", "auto", "--patience", "0"], "--patience and --max-steps must be"),
    (["distill", "--teacher", "{t}", "--steps", "5", "--eval-every", "0"], "--eval-every must be at least 1"),
    (["distill", "--teacher", "{t}", "--steps", "5", "--reference", "cifar10"], "unknown built-in data set"),
    (["distill", "--teacher", "{t}", "--steps", "5", "--reference", "digits"], "holds [1, 8, 8] samples"),
])
def test_bad_monitoring_settings_are_one_line_errors(tmp_path, toy_teacher, capsys, argv, msg):
    argv = [a.format(t=toy_teacher) for a in argv] + ["--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a 2-process launch: about 12 s on 2 cores
def test_two_processes_stop_together_where_the_main_one_decides(tmp_path):
    from test_multiprocess import TINY, launch

    out = tmp_path / "run"
    r = launch(2, "distill", *TINY, "--steps", "auto", "--max-steps", "12", "--eval-every", "3", "--patience", "1",
               "--lr", "1e-9", "--monitor-num", "20", "--monitor-steps", "2", "--heldout", "16", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "stop.json").read_text())["step"] == 6
    log = read_log(out / "log.jsonl")
    assert [x["step"] for x in log if x.get("kind") == "eval"] == [3, 6] and log[-1]["step"] == 6
    assert all(x["ranks_in_sync"] for x in log if x.get("kind") != "eval")


@pytest.fixture(scope="module")
def toy_student(toy_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "student"
    assert main(toy_argv(toy_teacher, out, "--steps", "300", "--no-report")) == 0
    return out


@pytest.mark.parametrize("k,objective", [(2, "consistency"), (1, "matching")])
def test_fewstep_steps_auto_watches_the_k_step_samples_and_resumes_to_the_same_stop(tmp_path, toy_teacher, toy_student,
                                                                                     capsys, k, objective):
    def argv(out, *extra):
        return ["fewstep", "--teacher", str(toy_teacher), "--student", str(toy_student), "--sampler-steps", str(k),
                "--fewstep-objective", objective, "--batch", "64", "--steps", "auto", "--eval-every", "40",
                "--patience", "2", "--monitor-num", "500", "--log-every", "20", "--ckpt-every", "40", "--no-report",
                "--lr-decay", "constant",  # the cut run below has another --max-steps: a cosine would differ
                "--no-progress", "--out", str(out), *extra]

    from dkdm.evaluation import data_free_score, teacher_statistics
    from dkdm.formats import load_model

    assert main(argv(tmp_path / "a", "--max-steps", "600")) == 0
    err = capsys.readouterr().err  # its own K-step sampler; the teacher's reference at 25 steps
    assert f"500 student samples x {k} step{'s' * (k > 1)}; once: teacher reference and noise floor 2 x 500 samples " \
           f"x 25 steps" in err
    rec = evals(tmp_path / "a")
    assert all(not any(key.startswith("heldout") for key in r) for r in rec)  # the DKDM terms are not its loss
    stop = json.loads((tmp_path / "a" / "stop.json").read_text())
    assert stop["step"] == rec[-1]["step"] < 600 and set(stop["best"]) == {"teacher_fd"}, (stop, rec)
    # the score is the saved (EMA) student's K-step samples against the teacher's 25-step ones, from the same noise
    teacher, student = load_model(toy_teacher), load_model(tmp_path / "a")
    stats = teacher_statistics(teacher, 500, 25, 0, progress=False, cache=False)
    samples = student.sample(500, k, torch.Generator().manual_seed(0))
    assert data_free_score(teacher, samples, stats) == pytest.approx(rec[-1]["teacher_fd"], rel=1e-6)
    assert data_free_score(teacher, student.sample(500, 25, torch.Generator().manual_seed(0)), stats) != \
        pytest.approx(rec[-1]["teacher_fd"], rel=1e-3)
    # cut before the stop, then resumed: the rule replays the log and stops at the same step, same weights
    assert main(argv(tmp_path / "b", "--max-steps", str(stop["step"] - 40))) == 0
    assert main(argv(tmp_path / "b", "--max-steps", "600", "--resume")) == 0
    assert json.loads((tmp_path / "b" / "stop.json").read_text()) == stop
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))
