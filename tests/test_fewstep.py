"""Few-step students (consistency distillation, consistency.py): the loss against a float64 hand
computation, the teacher's ODE step against diffusers' DDIM, the sampler against diffusers'
LCMScheduler in a plain DDPMPipeline, the variance outputs dropped for every family, and the
`dkdm fewstep` run (bad input, the written pipeline, kill -9 and resume)."""

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dkdm.cli import main
from dkdm.consistency import (SPACED_MAX_STEPS, SPACING, WIDE_MAX_STEPS, WIDE_SPACING, boundary_scalings, consistency_loss, lcm_timesteps,
                              pseudo_huber, sampler_timesteps, sigma_power, skip_steps, teacher_ode_step)
from dkdm.diffusion import Schedule
from dkdm.formats import load_model, save_model
from dkdm.model import DiffusionModel

from test_reliability import run_cli, same, spawn, wait_for_step, weights


def _cosine_alpha_bar64(T):
    """alpha_bar of improved-DDPM's cosine schedule in float64, from its definition."""
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    abar, prod = [], 1.0
    for i in range(T):
        prod *= 1 - min(1 - f(i + 1) / f(i), 0.999)
        abar.append(prod)
    return np.array(abar)


def test_consistency_loss_matches_a_float64_hand_computation():
    T = 1000
    sched = Schedule.named("cosine", T)
    abar = _cosine_alpha_bar64(T)
    g = torch.Generator().manual_seed(0)
    n = 6
    x_t, x_s = torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)
    v_student, v_target = torch.randn(n, 1, 4, 4, generator=g), torch.randn(n, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 19, 500, 998, 999])
    s = (t - skip_steps(T)).clamp(min=0)
    terms = consistency_loss(sched, v_student, v_target, x_t, t, x_s, s, "v_prediction", power=1.5)

    def f(v, x, step):  # LCM's boundary condition on a v-prediction, by hand
        a = abar[step]
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
        scaled = 10.0 * step
        return 0.25 / (scaled ** 2 + 0.25) * x + scaled / math.sqrt(scaled ** 2 + 0.25) * x0

    distance = []
    for i in range(n):
        d = f(v_student[i].double().numpy(), x_t[i].double().numpy(), int(t[i])) - \
            f(v_target[i].double().numpy(), x_s[i].double().numpy(), int(s[i]))
        c = 0.00054 * math.sqrt(d.size)
        distance.append(math.sqrt((d ** 2).sum() + c * c) - c)
    sigma = np.sqrt(1 - abar[t.numpy()]) ** 1.5  # the loss weighs each t's distance by 1 / sigma_t^power
    assert skip_steps(T) == 20
    np.testing.assert_allclose(terms["distance"].numpy(), np.array(distance), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(terms["loss"].numpy(), np.array(distance) / sigma, rtol=2e-5, atol=1e-6)
    assert sigma_power(1) == 1 and sigma_power(2) == sigma_power(8) == 2
    # at t = 0 the consistency function is the identity: the student's prediction has no say there
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1]), x_t[:2])
    assert c_skip.flatten().tolist() == [1.0, pytest.approx(0.25 / 100.25, rel=1e-6)] and c_out.flatten()[0] == 0
    # pseudo-Huber: ~ the L2 distance far away, ~ squared / 2c near 0
    a = torch.zeros(1, 64)
    assert pseudo_huber(a + 1, a).item() == pytest.approx(8.0, abs=0.005)


@pytest.mark.parametrize("clip", [False, True])
def test_teacher_ode_step_is_diffusers_ddim_with_eta_0(clip):
    from diffusers import DDIMScheduler

    T = 1000
    sched = Schedule.named("cosine", T)
    ddim = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                         set_alpha_to_one=False)
    ddim.set_timesteps(50)  # prev = t - 20, the consistency pair's skip
    g = torch.Generator().manual_seed(1)
    for step in (999, 519, 39, 20):
        x = torch.randn(4, 1, 8, 8, generator=g) * 2
        eps = torch.randn(4, 1, 8, 8, generator=g)
        t = torch.full((4,), step)
        target = sched.reverse(eps, x, t, "epsilon", "fixed_small", clip_x0=clip)
        ours = teacher_ode_step(sched, target, x, t, t - 20)
        # epsilon recomputed from the clamped x0, as guided-diffusion's ddim_sample does
        ref = ddim.step(eps, step, x, eta=0.0, use_clipped_model_output=True).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1000, 100, 20])
def test_lcm_timesteps_are_the_lcm_schedulers(T):
    from diffusers import LCMScheduler

    grid = min(50, T)
    lcm = LCMScheduler(num_train_timesteps=T, original_inference_steps=grid)
    for k in (1, 2, 3, 4, 8):
        lcm.set_timesteps(k)
        assert lcm_timesteps(k, T, grid) == lcm.timesteps.tolist()


@pytest.mark.parametrize("T, grid", [(1000, 50), (756, 50), (1000, 10), (100, 50), (20, 20)])
def test_sampler_timesteps_follow_the_geometric_rule(T, grid):
    from diffusers import LCMScheduler

    points = np.arange(1, grid + 1) * (T // grid) - 1
    for k in range(1, grid + 1):
        times = sampler_timesteps(k, T, grid)
        # K distinct grid timesteps from the top down: LCMScheduler takes them as custom timesteps
        assert len(times) == k and times[0] == points[-1] and set(times) <= set(points.tolist())
        assert all(a > b for a, b in zip(times, times[1:]))
        top, bottom = SPACING if k <= SPACED_MAX_STEPS else WIDE_SPACING
        if k > WIDE_MAX_STEPS:
            assert times == lcm_timesteps(k, T, grid)
        elif k > 1 and grid == 50 and T == 1000:  # room everywhere: each the grid point nearest its target
            targets = top * T * (bottom / top) ** (np.arange(k - 1) / max(k - 2, 1))
            nearest = [int(points[np.argmin(np.abs(points - w))]) for w in targets]
            assert times[1:] == nearest
    lcm = LCMScheduler(num_train_timesteps=T, original_inference_steps=grid)
    lcm.set_timesteps(timesteps=sampler_timesteps(min(4, grid), T, grid))
    assert lcm.timesteps.tolist() == sampler_timesteps(min(4, grid), T, grid)


@pytest.fixture(scope="module")
def digits_few(tmp_path_factory):
    """The bundled teacher made a 4-step consistency model (untrained: the sampler is what is tested)."""
    teacher = load_model("builtin:digits")
    d = tmp_path_factory.mktemp("few") / "model"
    save_model(DiffusionModel.few_step_of(teacher, 4), d)
    return d


def test_a_few_step_student_samples_the_same_in_plain_diffusers(digits_few):
    from diffusers import DDPMPipeline, LCMScheduler

    model = load_model(digits_few)
    assert model.sampler_steps == 4 and model.prediction == "v_prediction" and model.variance == "fixed_small"
    pipe = DDPMPipeline.from_pretrained(digits_few)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    for k in (1, 2, 4):
        ours = model.sample(6, k, torch.Generator().manual_seed(3))
        # the loop the model card shows: LCMScheduler at the student's K timesteps
        g = torch.Generator().manual_seed(3)
        x = torch.randn(6, 1, 8, 8, generator=g)
        pipe.scheduler.set_timesteps(timesteps=sampler_timesteps(k, 1000))
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, generator=g).prev_sample
        torch.testing.assert_close(ours, x, rtol=0, atol=4e-5)
    # DDPMPipeline's own call takes LCMScheduler's evenly spaced timesteps: one step is the same
    images = pipe(batch_size=6, generator=torch.Generator().manual_seed(3), num_inference_steps=1, output_type="np").images
    theirs = torch.from_numpy(images).permute(0, 3, 1, 2)
    ours = model.sample(6, 1, torch.Generator().manual_seed(3))
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=2e-5)
    assert model.sample(3).shape == (3, 1, 8, 8)  # K steps by default


def test_the_model_cards_code_samples_a_few_step_student(digits_few):
    from dkdm.formats.hub import model_card

    code = model_card(digits_few).split("```python\n")[1].split("```")[0]
    assert "set_timesteps(timesteps=[999, 299, 119, 39])" in code
    scope = {}  # the same noise as dkdm's sampler draws: seeded after the loading
    exec(code.replace('from_pretrained("model")', f'from_pretrained("{digits_few}")')
         .replace("x = torch.randn(", "torch.manual_seed(5)\nx = torch.randn("), scope)
    model = load_model(digits_few)
    torch.manual_seed(5)
    ours = model.sample(16, 4, torch.default_generator)
    torch.testing.assert_close(scope["images"], (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=4e-5)


@pytest.mark.parametrize("spec", ["unet:widths=8-16,layers=1,groups=4", "dit:width=32,heads=2,depth=1,patch=2",
                                  "uvit:width=32,heads=2,depth=3,patch=2", "mlp:width=16,depth=1", "adm:num_channels=32,num_res_blocks=1,channel_mult=1-2,attention_resolutions=4,num_head_channels=16"])
def test_dropping_the_variance_outputs_keeps_the_prediction(spec):
    shape = (8,) if spec.startswith("mlp") else (2, 8, 8)
    torch.manual_seed(0)
    model = DiffusionModel.build(spec, shape, Schedule.named("cosine", 100))
    for p in model.parameters():  # zero-initialised heads would hide a wrong slice
        p.data.normal_(0, 0.1)
    few = DiffusionModel.few_step_of(model, 2, prediction="epsilon")
    x = torch.randn(3, *shape)
    t = torch.tensor([0, 40, 99])
    torch.testing.assert_close(few(x, t), model(x, t)[:, :shape[0]])


def test_fewstep_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["fewstep", "--out", str(tmp_path / "a")]) == 2
    assert "--student is required" in capsys.readouterr().err
    assert main(["fewstep", "--student", "builtin:digits", "--sampler-steps", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--sampler-steps must be at least 1" in capsys.readouterr().err
    assert main(["fewstep", "--student", "builtin:digits", "--sampler-steps", "60", "--out", str(tmp_path / "c")]) == 2
    assert "--sampler-steps must be in 1..50" in capsys.readouterr().err.strip().splitlines()[-1]
    teacher = tmp_path / "toy"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=8,depth=1", "--diffusion-steps", "20", "--steps",
                 "2", "--no-report", "--no-progress", "--out", str(teacher)]) == 0
    assert main(["fewstep", "--teacher", str(teacher), "--student", "builtin:digits", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "models samples of shape [1, 8, 8]" in err and "start from a student of this teacher" in err
    assert not any((tmp_path / n).exists() for n in "abcd")


def _fewstep(teacher, student, out, steps, *extra):
    return ["fewstep", "--teacher", str(teacher), "--student", str(student), "--sampler-steps", "2",
            "--fewstep-objective", "consistency", "--batch", "32",  # a later --fewstep-objective overrides it
            "--rho", "0.5", "--steps", str(steps), "--ckpt-every", "100", "--log-every", "10", "--no-progress",
            "--no-report", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    """A toy teacher (T = 20) and a DKDM student of it."""
    d = tmp_path_factory.mktemp("pair")
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=16,depth=1", "--diffusion-steps", "20",
                 "--batch", "32", "--steps", "50", "--no-report", "--no-progress", "--out", str(d / "teacher")]) == 0
    assert main(["distill", "--teacher", str(d / "teacher"), "--student", "mlp:width=16,depth=1", "--batch", "32",
                 "--rho", "0.5", "--steps", "50", "--no-report", "--no-progress", "--out", str(d / "student")]) == 0
    return d / "teacher", d / "student"


def test_fewstep_run_writes_a_k_step_model_that_resumes_bit_identically_after_kill_9(tmp_path, toy_pair, capsys):
    teacher, student = toy_pair
    steps = 500
    assert main(_fewstep(teacher, student, tmp_path / "a", steps)) == 0
    err = capsys.readouterr().err  # the distill run's pool is taken over: no teacher step is spent preparing one
    assert "no preparation" in err and f"pool: taken over from {student}" in err
    saved = json.loads((tmp_path / "a" / "run.json").read_text())
    assert saved["command"] == "fewstep" and saved["sampler_steps"] == 2
    model = load_model(tmp_path / "a")
    assert model.sampler_steps == 2 and model.extra["sampler"]["grid"] == 20
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["vb"] == 0 and log[-1]["mse"] < log[0]["mse"]  # the consistency distance falls
    assert log[-1]["teacher_calls"] == steps * 32
    proc = spawn(_fewstep(teacher, student, tmp_path / "b", steps))
    wait_for_step(tmp_path / "b", 250, proc)  # between the checkpoints at 200 and 300
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_cli(_fewstep(teacher, student, tmp_path / "b", steps, "--resume")) == 0
    same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_fewstep_defaults_take_distills_budget_and_a_fifth_of_the_rate():
    from dkdm.defaults import distill_defaults, fewstep_defaults

    d, f = distill_defaults(517_754, (1, 8, 8), 1000), fewstep_defaults(517_754, (1, 8, 8), 1000)
    assert f["steps"].value == d["steps"].value == 1200
    assert f["lr"].value == pytest.approx(d["lr"].value / 5) and f["warmup"].value == 200
    assert {k: v.value for k, v in f.items() if k not in ("steps", "lr", "warmup")} == \
        {k: v.value for k, v in d.items() if k not in ("steps", "lr", "warmup")}
    given = fewstep_defaults(517_754, (1, 8, 8), 1000, {"steps": 20_000, "lr": 1e-3})
    assert "steps" not in given and "lr" not in given and given["warmup"].value == 400


def test_fewstep_without_teacher_learns_from_the_one_the_student_was_distilled_from(tmp_path, toy_pair, capsys):
    teacher, student = toy_pair
    args = [a for a in _fewstep(teacher, student, tmp_path / "a", 2, "--dry-run")]
    del args[1:3]  # no --teacher
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"(teacher {Path(teacher).resolve()}:" in err and f"pool: taken over from {student}" in err
    # another teacher given explicitly, of another schedule: said in one line, with what differs
    other = tmp_path / "cosine"
    assert main(["train", "--data", "toy2d", "--model", "mlp:width=16,depth=1", "--diffusion-steps", "20", "--schedule",
                 "cosine", "--steps", "2", "--no-report", "--no-progress", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["fewstep", "--student", str(student), "--teacher", str(other), "--steps", "2", "--no-progress",
                 "--no-report", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "student's schedule (linear, 20 steps" in err and "(cosine, 20 steps" in err and "--teacher the one" in err
