"""Diffusion math against independent references: the DKDM authors' tensors and diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dkdm.diffusion import Schedule, kl_bits, normal_kl, reverse_sample


def rel_close(a, b, tol=1e-5, atol=0.0):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1e-12) + atol, f"max abs err {err:.3e} vs scale {scale:.3e}"


def test_cosine_schedule_matches_reference(adm_reference):
    s = Schedule.named("cosine", 1000)
    assert torch.allclose(s.betas, adm_reference["betas"], rtol=1e-12, atol=0)
    assert torch.allclose(
        s.posterior_log_variance_clipped, adm_reference["posterior_log_variance_clipped"], rtol=1e-12
    )


def test_teacher_reverse_step_matches_reference(adm_reference):
    r = adm_reference
    s = Schedule.named("cosine", 1000)
    step = s.reverse(r["model_output"], r["x"], r["t"], "epsilon", "learned_range", clip_x0=True)
    rel_close(step.eps, r["teacher_eps"])
    rel_close(step.x0, r["teacher_pred_xstart"])
    rel_close(step.mean, r["teacher_mean"])
    rel_close(step.variance, r["teacher_variance"])
    rel_close(step.log_variance, r["teacher_log_variance"])


@pytest.mark.parametrize("name,dname", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                        ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(name, dname):
    ours = Schedule.named(name, 1000)
    theirs = DDPMScheduler(**ours.to_diffusers())
    assert theirs.config.beta_schedule == dname
    assert torch.allclose(ours.betas.float(), theirs.betas, rtol=1e-6, atol=1e-9)
    back = Schedule.from_diffusers(dict(theirs.config))
    assert torch.allclose(back.betas, ours.betas, rtol=1e-9)


def test_linear_schedule_is_scaled_for_short_processes():
    s = Schedule.named("linear", 100)
    assert s.betas[0].item() == pytest.approx(1e-3) and s.betas[-1].item() == pytest.approx(0.2)


def _diffusers_step(sched, model_output, t, x, seed):
    g = torch.Generator().manual_seed(seed)
    out = sched.step(model_output, t, x, generator=g).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return out, noise


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [1, 5, 42, 99])
def test_reverse_step_matches_diffusers(variance, prediction, t):
    ours = Schedule.named("cosine", 100)
    sched = DDPMScheduler(**ours.to_diffusers(), variance_type=variance,
                          prediction_type=prediction, clip_sample=True, clip_sample_range=1.0)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4)
    chans = 4 if variance == "learned_range" else 2
    out = torch.randn(3, chans, 4, 4)
    if variance == "learned_range":
        out[:, 2:] = out[:, 2:].tanh()
    tt = torch.full((3,), t)
    step = ours.reverse(out, x, tt, prediction, variance, clip_x0=True)
    # diffusers draws the variance noise after computing the mean: prev = mean + std * noise
    prev, noise = _diffusers_step(sched, out, t, x, seed=1)
    mine = reverse_sample(step, tt, noise)
    rel_close(mine, prev, 1e-5)
    pv = out[:, 2:] if variance == "learned_range" else None
    dvar = sched._get_variance(t, predicted_variance=pv, variance_type=variance)
    if variance == "learned_range":  # diffusers returns the log-variance here, in float32
        rel_close(step.log_variance, dvar, 1e-5, atol=1e-6)
    else:
        rel_close(step.variance, dvar.expand_as(step.variance), 1e-5)


def test_posterior_is_consistent_with_forward_process_float64():
    s = Schedule.named("linear", 50)
    torch.manual_seed(1)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 25, 49])
    ab = s.alphas_cumprod[t][:, None]
    abp = s.alphas_cumprod_prev[t][:, None]
    a = 1 - s.betas[t][:, None]
    noise = torch.randn_like(x0)
    xt = s.q_sample(x0, t, noise)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    post = s.q_posterior(x0, xt, t)
    # closed form (DDPM eq. 7)
    mean = (abp.sqrt() * (1 - a) / (1 - ab)) * x0 + (a.sqrt() * (1 - abp) / (1 - ab)) * xt
    var = (1 - abp) / (1 - ab) * (1 - a)
    assert torch.allclose(post.mean, mean) and torch.allclose(post.variance, var.expand_as(xt))
    assert torch.allclose(post.eps, noise)
    # an epsilon model that predicts the true noise recovers the posterior exactly
    step = s.reverse(noise, xt, t, "epsilon", "fixed_small")
    assert torch.allclose(step.mean, post.mean) and torch.allclose(step.x0, x0)
    v = s.v_target(x0, t, noise)
    assert torch.allclose(s.reverse(v, xt, t, "v_prediction", "fixed_small").x0, x0)


def test_kl_matches_closed_form_and_is_in_bits():
    m1, m2 = torch.tensor([[0.3]]), torch.tensor([[-0.2]])
    lv1, lv2 = torch.tensor([[np.log(0.5)]]), torch.tensor([[np.log(2.0)]])
    expected = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expected, rel=1e-6)
    from dkdm.diffusion import Reverse
    p = Reverse(m1, m1, m1, lv1.exp(), lv1)
    q = Reverse(m2, m2, m2, lv2.exp(), lv2)
    assert kl_bits(p, q).item() == pytest.approx(expected / np.log(2), rel=1e-6)


def test_respacing_keeps_alpha_bar():
    s = Schedule.named("cosine", 1000)
    r, ts = s.respace(50)
    assert r.num_steps == 50 and ts[0] == 0 and ts[-1] == 999
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[ts], rtol=1e-10)
