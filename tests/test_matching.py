"""Few-step students by distribution matching (matching.py): the gradient and loss against a float64
hand computation, the first timestep against the cosine schedule's closed form, the saved generator
against plain diffusers' LCMScheduler, and the `dkdm fewstep --fewstep-objective matching` run (bad
input, defaults, the written model, kill -9 and resume)."""

import copy
import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkdm.cli import main
from dkdm.diffusion import Schedule
from dkdm.formats import load_model, save_model
from dkdm.matching import MatchingSource, first_timestep, generator_schedule, matching_gradient, matching_loss
from dkdm.model import DiffusionModel

from test_fewstep import _cosine_alpha_bar64, _fewstep, toy_pair  # noqa: F401 (a fixture)
from test_reliability import run_cli, same, spawn, wait_for_step, weights


def test_matching_gradient_and_loss_match_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    x_g, real, fake = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    grad = matching_gradient(x_g, real, fake)
    for i in range(3):  # DMD: (fake - real) / mean |x_g - real| of each sample
        scale = np.abs(x_g[i].numpy() - real[i].numpy()).mean()
        np.testing.assert_allclose(grad[i].numpy(), (fake[i].numpy() - real[i].numpy()) / scale, rtol=1e-12)
    x = x_g.clone().requires_grad_(True)
    loss = matching_loss(x, grad)
    np.testing.assert_allclose(loss.detach().numpy(), 0.5 * (grad ** 2).flatten(1).mean(1).numpy(), rtol=1e-12)
    loss.sum().backward()  # the loss only carries the gradient: d/dx_g = grad / values per sample
    np.testing.assert_allclose(x.grad.numpy(), grad.numpy() / 32, rtol=1e-12)


def test_the_first_timestep_has_noise_to_signal_2_5():
    abar = _cosine_alpha_bar64(1000)
    expected = int(np.abs(np.sqrt((1 - abar) / abar) - 2.5).argmin())
    schedule = Schedule.named("cosine", 1000)
    assert first_timestep(schedule) == expected == 755
    cut = generator_schedule(schedule)
    assert cut.num_steps == expected + 1
    torch.testing.assert_close(cut.alphas_cumprod, schedule.alphas_cumprod[: expected + 1])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # DDPM's linear betas
    assert first_timestep(Schedule.named("linear", 1000)) == int(np.abs(np.sqrt((1 - abar) / abar) - 2.5).argmin())


def test_a_matching_generator_samples_the_same_in_plain_diffusers(tmp_path):
    from diffusers import DDPMPipeline, LCMScheduler

    teacher = load_model("builtin:digits")
    cut = generator_schedule(teacher.schedule)
    save_model(DiffusionModel.few_step_of(teacher, 2, "epsilon", cut.num_steps, cut, "matching"), tmp_path / "g")
    model = load_model(tmp_path / "g")
    assert model.sampler_steps == 2 and model.extra["sampler"]["objective"] == "matching"
    pipe = DDPMPipeline.from_pretrained(tmp_path / "g")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.num_train_timesteps == 756
    pipe.set_progress_bar_config(disable=True)
    for k in (1, 2, 4):
        ours = model.sample(5, k, torch.Generator().manual_seed(2))
        images = pipe(batch_size=5, generator=torch.Generator().manual_seed(2), num_inference_steps=k,
                      output_type="np").images
        torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), torch.from_numpy(images).permute(0, 3, 1, 2),
                                   rtol=0, atol=2e-5)
    # the first step denoises pure noise as the DKDM network would at t* (already a digit-like sample)
    assert pipe.scheduler.timesteps.tolist()[0] == 755


def test_matching_refuses_consistency_flags_in_one_line(tmp_path, capsys):
    base = ["fewstep", "--student", "builtin:digits", "--fewstep-objective", "matching"]
    assert main([*base, "--consistency-grid", "10", "--out", str(tmp_path / "a")]) == 2
    assert "belong to --fewstep-objective consistency" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*base, "--fewstep-objective", "dmd", "--out", str(tmp_path / "b")]) == 2
    assert "invalid choice: 'dmd'" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "ab")


def test_the_fake_scores_rate_is_the_generators_unless_fake_lr_names_one(tmp_path, toy_pair, capsys, monkeypatch):
    """--fake-lr sets the fake score's (constant) learning rate apart from the generator's; a
    consistency run, which has no fake score, refuses it in one line."""
    import dkdm.matching as matching

    teacher, student = toy_pair
    rates = []
    monkeypatch.setattr(matching.MatchingSource, "describe",
                        lambda self: rates.append(self.opt.param_groups[0]["lr"]) or {"kind": "matching"})
    flags = ("--fewstep-objective", "matching", "--lr", "2e-4")
    assert main(_fewstep(teacher, student, tmp_path / "a", 3, *flags)) == 0
    assert main(_fewstep(teacher, student, tmp_path / "b", 3, *flags, "--fake-lr", "5e-3")) == 0
    assert rates == [2e-4, 5e-3]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["fake_lr"] == 5e-3  # resumed as it ran
    capsys.readouterr()
    assert main(_fewstep(teacher, student, tmp_path / "c", 3, "--fake-lr", "5e-3")) == 2
    assert "--fake-lr belongs to --fewstep-objective matching" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(_fewstep(teacher, student, tmp_path / "d", 3, "--fake-lr", "5e-3", "--fake-updates", "2")) == 2
    assert "--fake-lr and --fake-updates belong to" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_fake_from_teacher_starts_the_fake_score_as_a_trainable_copy_of_the_teacher(tmp_path, toy_pair, capsys,
                                                                                       monkeypatch):
    """--fake-from teacher: the fake score starts with the teacher's weights (the DKDM student's by
    default), trains without touching the teacher, is announced, saved with the run's settings, and a
    consistency run refuses the flag in one line."""
    import dkdm.matching as matching

    teacher, student = toy_pair
    starts = []
    monkeypatch.setattr(matching.MatchingSource, "describe", lambda self: starts.append(
        (copy.deepcopy(self.fake.net.state_dict()), self.teacher.net.state_dict())) or {"kind": "matching"})
    flags = ("--fewstep-objective", "matching")
    assert main(_fewstep(teacher, student, tmp_path / "a", 20, *flags)) == 0
    assert "a fake score from the same student" in capsys.readouterr().err
    assert main(_fewstep(teacher, student, tmp_path / "b", 20, *flags, "--fake-from", "teacher")) == 0
    assert "a fake score from the teacher" in capsys.readouterr().err
    (own, _), (copied, teachers) = starts
    same(own, load_model(student).net.state_dict())
    same(copied, load_model(teacher).net.state_dict())
    same(teachers, load_model(teacher).net.state_dict())  # the teacher itself never trained
    trained = load_matching_fake(tmp_path / "b")
    assert trained.keys() == copied.keys() and any(not torch.equal(trained[k], copied[k]) for k in copied)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["fake_from"] == "teacher"
    assert main(_fewstep(teacher, student, tmp_path / "c", 3, "--fake-from", "teacher")) == 2
    assert "--fake-from belongs to --fewstep-objective matching" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


def test_the_teachers_fake_score_copy_starts_from_its_full_precision_weights(tmp_path, toy_pair, monkeypatch):
    """--fake-from teacher with --teacher-dtype bfloat16: the teacher runs with its weights rounded to
    bfloat16 in place, but the fake score, which trains, starts from the teacher's float32 weights."""
    import dkdm.matching as matching

    teacher, student = toy_pair
    starts = []
    monkeypatch.setattr(matching.MatchingSource, "describe", lambda self: starts.append(
        {k: v.clone() for k, v in self.fake.net.state_dict().items()}) or {"kind": "matching"})
    assert main(_fewstep(teacher, student, tmp_path / "a", 2, "--fewstep-objective", "matching", "--fake-from",
                         "teacher", "--teacher-dtype", "bfloat16")) == 0
    full = load_model(teacher).net.state_dict()
    assert all(v.dtype == torch.float32 for v in starts[0].values())
    same(starts[0], full)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in full.values())  # rounding would have shown


def load_matching_fake(run) -> dict:
    """The fake score's weights in a matching run's last checkpoint."""
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    tensors = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items()}
    return {k.removeprefix("source.fake."): v for k, v in tensors.items() if k.startswith("source.fake.")}


def test_matching_defaults_take_0_7_of_the_budget_and_a_tenth_of_the_rate():
    from dkdm.defaults import distill_defaults, fewstep_defaults

    d = distill_defaults(517_754, (1, 8, 8), 1000)
    m = fewstep_defaults(517_754, (1, 8, 8), 1000, objective="matching")
    assert m["steps"].value == d["steps"].value * 7 // 10 == 840 and m["warmup"].value == 100
    assert m["lr"].value == pytest.approx(d["lr"].value / 10) and "rho" not in m
    assert fewstep_defaults(517_754, (1, 8, 8), 1000, {"steps": 40}, objective="matching")["warmup"].value == 40


def test_matching_gives_two_steps_of_a_student_outside_the_convolutional_families_a_fifth_of_its_rate():
    """docs/few-step.md: DiT two-step generators scored 1.45-1.51x the teacher at a fifth of distill's
    rate against 1.54-1.70x at a tenth; at one and four steps a fifth lost."""
    from dkdm.defaults import distill_defaults, fewstep_defaults

    for family in ("dit", "uvit", "import"):
        d = distill_defaults(825_508, (1, 8, 8), 1000, family=family)
        for k, share in ((1, 10), (2, 5), (3, 10), (4, 10)):
            m = fewstep_defaults(825_508, (1, 8, 8), 1000, family=family, objective="matching", sampler_steps=k)
            assert m["lr"].value == pytest.approx(d["lr"].value / share) == pytest.approx(3e-3 / share)
            assert ("a fifth" if share == 5 else "a tenth") in m["lr"].why and f"family {family}" in m["lr"].why
    for k in (1, 2):
        u = fewstep_defaults(825_508, (1, 8, 8), 1000, family="unet", objective="matching", sampler_steps=k)
        assert u["lr"].value == pytest.approx(1e-4) and "a tenth" in u["lr"].why


def test_matching_run_writes_a_k_step_generator_that_resumes_bit_identically_after_kill_9(tmp_path, toy_pair, capsys):
    teacher, student = toy_pair
    steps, flags = 400, ("--fewstep-objective", "matching")
    assert main(_fewstep(teacher, student, tmp_path / "a", steps, *flags)) == 0
    err = capsys.readouterr().err
    assert "distribution matching" in err and "no pool" in err and f"{steps * 32:,} teacher sample-forwards" in err
    model = load_model(tmp_path / "a")
    assert model.sampler_steps == 2 and model.prediction == "epsilon"
    assert model.schedule.num_steps == first_timestep(load_model(teacher).schedule) + 1
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["teacher_calls"] == steps * 32 and np.isfinite(log[-1]["loss"])
    assert model.sample(7).shape == (7, 2)
    proc = spawn(_fewstep(teacher, student, tmp_path / "b", steps, *flags))
    wait_for_step(tmp_path / "b", 250, proc)  # between the checkpoints at 200 and 300
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_cli(_fewstep(teacher, student, tmp_path / "b", steps, *flags, "--resume")) == 0
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.parametrize("k,objective", [(1, "matching"), (2, "matching"), (4, "consistency")])
def test_the_objective_follows_k_where_not_given_and_is_printed(tmp_path, capsys, k, objective):
    out = tmp_path / "run"
    assert main(["fewstep", "--student", "builtin:digits", "--sampler-steps", str(k), "--dry-run", "--no-report",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"fewstep-objective {objective} (" in err
    how = "), distribution matching (" if objective == "matching" else "), consistency distillation ("
    assert how in err and ("no pool" in err) == (objective == "matching")
    assert not out.exists()


@pytest.mark.parametrize("k,objective", [(2, "matching"), (4, "matching"), (8, "consistency")])
def test_a_transformer_students_objective_is_matching_up_to_four_steps(tmp_path, capsys, k, objective):
    """Outside the convolutional families (a DiT here) distribution matching is the rule up to 4 steps:
    read from the DKDM student the run starts from (docs/few-step.md)."""
    from dkdm.defaults import fewstep_objective

    assert [fewstep_objective(k, f).value for f in ("unet", "adm", "dit", "uvit", "import")] == \
        [("matching" if k <= 2 else "consistency")] * 2 + [objective] * 3
    teacher = load_model("builtin:digits")
    save_model(DiffusionModel.student_of(teacher, "dit:patch=2,depth=1,width=32,heads=2"), tmp_path / "dit")
    assert main(["fewstep", "--student", str(tmp_path / "dit"), "--sampler-steps", str(k), "--dry-run", "--no-report",
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert f"fewstep-objective {objective} (" in err and ("of a dit student" in err) == (objective == "matching")
    assert ("for two steps outside the convolutional families" in err) == (k == 2)  # the run's own K
    fake = {2: "fake-from student (", 4: "fake-from teacher (", 8: None}[k]  # a consistency run has no fake score
    assert (fake in err) if fake else "fake-from" not in err


def test_a_run_from_before_fake_from_resumes_with_the_students_copy(tmp_path, capsys):
    """A matching run whose run.json predates --fake-from (no such key) had the DKDM student's copy as
    its fake score: resumed, it keeps that copy (its checkpoint holds it) even where the rule now says
    the teacher's (a DiT's four-step generator)."""
    teacher = load_model("builtin:digits")
    save_model(DiffusionModel.student_of(teacher, "dit:patch=2,depth=1,width=32,heads=2"), tmp_path / "dit")
    run = ["fewstep", "--student", str(tmp_path / "dit"), "--sampler-steps", "4", "--batch", "8", "--no-report",
           "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*run, "--steps", "2", "--fake-from", "student"]) == 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    del saved["fake_from"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(saved))
    assert main([*run, "--steps", "3", "--resume"]) == 0  # the rule's teacher copy would not load its checkpoint
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def _judged(monkeypatch, batch: int, fake_updates: int = 1, prediction: str = "epsilon"):
    """A one-step generator, teacher and fake score (tiny MLPs; the fake score predicting
    ``prediction``), a copy of the fake score to replay its steps by hand, and one ``judge`` of
    ``batch`` samples with every noisy batch it drew recorded as (t, noise, x_t)."""
    torch.manual_seed(0)
    teacher = DiffusionModel.build("mlp:width=8,depth=1", (2,), Schedule.named("linear", 100))
    cut = generator_schedule(teacher.schedule)
    gen = DiffusionModel.few_step_of(teacher, 1, "epsilon", cut.num_steps, cut, "matching")
    fake = DiffusionModel.build("mlp:width=8,depth=1", (2,), teacher.schedule, prediction=prediction)
    replay = copy.deepcopy(fake.net)
    source = MatchingSource(gen, teacher, fake, batch, 1e-3, fake_updates=fake_updates)
    seen = []
    q_sample = teacher.schedule.q_sample
    monkeypatch.setattr(teacher.schedule, "q_sample", lambda x0, t, noise: seen.append((t, noise, q_sample(x0, t, noise)))
                        or seen[-1][2])
    x_g = torch.randn(batch, 2)
    grad = source.judge(x_g)
    opt = torch.optim.AdamW(replay.parameters(), lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0)

    ab = teacher.schedule.alphas_cumprod.double()

    def target(t, noise):  # what the fake score learns, in float64 from alpha_bar: epsilon, v or x0
        a, s = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
        x0 = x_g.double()
        return {"epsilon": noise.double(), "v_prediction": a * noise.double() - s * x0, "sample": x0}[prediction]

    def step(t, noise, x_t):  # the fake score's step, by hand on the replay
        opt.zero_grad()
        F.mse_loss(replay(x_t, t)[:, :2], target(t, noise).float()).backward()
        opt.step()

    def x0(m, t, x_t, prediction="epsilon"):
        return teacher.schedule.eps_and_x0(m(x_t, t)[:, :2], x_t, t, prediction)[1]

    return SimpleNamespace(teacher=teacher, fake=fake, replay=replay, source=source, seen=seen, x_g=x_g, grad=grad,
                           step=step, x0=x0)


def test_the_scores_judge_the_generator_between_2_percent_of_t_and_t_star_and_the_fake_score_steps_there(monkeypatch):
    j = _judged(monkeypatch, 4096)
    assert len(j.seen) == 1  # one noisy batch read by both scores and trained on by the fake
    t, noise, x_t = j.seen[0]
    assert j.grad.shape == (4096, 2) and int(t.min()) == 2 and int(t.max()) == first_timestep(j.teacher.schedule)
    assert j.source.teacher_calls == 4096
    with torch.no_grad():  # the gradient from the fake score before its step, the step on the same x_t
        torch.testing.assert_close(j.grad, matching_gradient(j.x_g, j.x0(j.teacher.net, t, x_t), j.x0(j.replay, t, x_t)))
    j.step(t, noise, x_t)
    for a, b in zip(j.fake.net.parameters(), j.replay.parameters()):
        torch.testing.assert_close(a, b)


def test_fake_updates_step_the_fake_score_on_fresh_noisy_batches_before_the_one_the_teacher_reads(monkeypatch):
    """DMD2's two time-scale rule: with fake_updates=3 the fake score takes two steps on G's samples
    noised apart, then the shared step; the gradient is read from the fake score after the first
    two, the teacher is read once (a hand replay of the three AdamW steps)."""
    j = _judged(monkeypatch, 256, fake_updates=3)
    assert j.source.describe()["fake_updates"] == 3
    seen = j.seen
    assert len(seen) == 3 and j.source.teacher_calls == 256
    assert not torch.equal(seen[0][1], seen[1][1]) and not torch.equal(seen[1][0], seen[2][0])
    j.step(*seen[0])
    j.step(*seen[1])
    t, noise, x_t = seen[2]
    with torch.no_grad():
        torch.testing.assert_close(j.grad, matching_gradient(j.x_g, j.x0(j.teacher.net, t, x_t), j.x0(j.replay, t, x_t)))
    j.step(*seen[2])
    for a, b in zip(j.fake.net.parameters(), j.replay.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_a_fake_score_that_predicts_v_or_x0_learns_and_judges_in_its_own_terms(monkeypatch, prediction):
    """A fake score copied from a teacher that predicts v or x0 (--fake-from teacher) steps on its own
    target (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 from float64, or x0 itself) and its x0
    is read through its own parameterization (a hand replay of the AdamW step)."""
    j = _judged(monkeypatch, 512, prediction=prediction)
    t, noise, x_t = j.seen[0]
    with torch.no_grad():
        torch.testing.assert_close(j.grad, matching_gradient(j.x_g, j.x0(j.teacher.net, t, x_t),
                                                             j.x0(j.replay, t, x_t, prediction)))
    j.step(t, noise, x_t)
    for a, b in zip(j.fake.net.parameters(), j.replay.parameters()):
        torch.testing.assert_close(a, b)


def test_a_k_step_generator_trains_its_last_step_on_its_own_earlier_steps_sample():
    from dkdm.consistency import consistency_output

    torch.manual_seed(0)
    teacher = DiffusionModel.build("mlp:width=8,depth=1", (2,), Schedule.named("linear", 100))
    cut = generator_schedule(teacher.schedule)
    gen = DiffusionModel.few_step_of(teacher, 3, "epsilon", cut.num_steps, cut, "matching")
    gen.clip_x0 = True
    source = MatchingSource(gen, teacher, DiffusionModel.build("mlp:width=8,depth=1", (2,), teacher.schedule), 64, 1e-3)
    rng = torch.Generator().set_state(source.rng.get_state())
    times = source.times
    assert len(times) == 3 and times[0] == first_timestep(teacher.schedule) and times[0] > times[1] > times[2]
    for _ in range(3):  # every batch: the last step's input, the sampler's own first two steps re-noised
        batch = source.next_batch()
        assert (batch.t == times[-1]).all()
        x = torch.randn(64, 2, generator=rng)
        for j in range(2):
            t = torch.full((64,), times[j])
            x0 = consistency_output(cut, gen.net(x, t).detach(), x, t, "epsilon").clamp(-1, 1)
            x = cut.q_sample(x0, torch.full((64,), times[j + 1]), torch.randn(64, 2, generator=rng))
        torch.testing.assert_close(batch.x_t, x)
