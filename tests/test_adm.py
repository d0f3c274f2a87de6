"""ADM / guided-diffusion checkpoints: same function as the authors' code, safe loading, clear refusals."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADM
from dkdm.cli import main
from dkdm.errors import DkdmError
from dkdm.formats import load_checkpoint_file, load_model
from dkdm.objective import dkdm_loss

CONFIG = ADM / "adm_config.json"
TEACHER = ADM / "adm_unet.safetensors"


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def teacher(adm_reference):
    return load_checkpoint_file(TEACHER, CONFIG)


def test_adm_checkpoint_computes_the_reference_output(teacher, adm_reference):
    r = adm_reference
    assert teacher.schedule.num_steps == 1000 and teacher.variance == "learned_range"
    assert torch.allclose(torch.as_tensor(teacher.schedule.betas), r["betas"], rtol=1e-12, atol=0)
    with torch.no_grad():
        out = teacher(r["x"], r["t"])
    assert rel(out, r["model_output"]) < 1e-5


def test_adm_reverse_step_and_dkdm_loss_match_the_authors(teacher, adm_reference):
    r = adm_reference
    with torch.no_grad():
        step = teacher.reverse(r["x"], r["t"])
        student = load_checkpoint_file(ADM / "adm_student.safetensors", CONFIG)
        s_out = student(r["x"], r["t"])
    assert rel(step.mean, r["teacher_mean"]) < 1e-5
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies float32 rounding by 1/sqrt(abar)
    # (about 2e3 at t=999 of the cosine schedule), so the bound scales with it
    amp = torch.as_tensor(1 / teacher.schedule.alphas_cumprod[r["t"].numpy()]).sqrt().float()
    err = (step.x0 - r["teacher_pred_xstart"]).abs().flatten(1).max(1).values
    assert (err <= 1e-5 * amp * r["x"].abs().max()).all(), (err, amp)
    assert rel(s_out, r["student_output"]) < 1e-5
    terms = dkdm_loss(teacher.schedule, s_out, r["x"], r["t"], step, "epsilon", "learned_range")
    for key in ("mse", "vb", "loss"):
        want = r[f"loss_{key}" if key != "loss" else "loss"]
        assert torch.allclose(terms[key], want.to(terms[key].dtype), rtol=1e-5, atol=1e-12), key


def test_pt_state_dict_loads_weights_only_and_yaml_flags_work(tmp_path, adm_reference):
    import yaml

    state = load_file(str(TEACHER))
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "flags.yaml").write_text(yaml.safe_dump(json.loads(CONFIG.read_text())))
    m = load_model(tmp_path / "model.pt", config=tmp_path / "flags.yaml")
    with torch.no_grad():
        assert rel(m(adm_reference["x"], adm_reference["t"]), adm_reference["model_output"]) < 1e-5


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_that_needs_unpickling_is_refused(tmp_path, capsys, adm_reference):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(DkdmError, match="never unpickles"):
        load_checkpoint_file(tmp_path / "evil.pt", CONFIG)
    assert "this must never run" not in capsys.readouterr().out
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DkdmError, match="does not hold a state dict"):
        load_checkpoint_file(tmp_path / "list.pt", CONFIG)


@pytest.mark.parametrize("change, message", [
    ({"num_channels": 64}, "time_embed.0.weight has shape [128, 32] in the checkpoint but [256, 64]"),
    ({"attention_resolutions": "16"}, "it lacks output_blocks.3.1.in_layers.0.weight"),
    ({"learn_sigma": False}, "out.2.weight has shape [6, 32, 3, 3] in the checkpoint but [3, 32, 3, 3]"),
    ({"num_chanels": 32}, "unknown ADM flag(s) num_chanels"),
])
def test_config_that_does_not_fit_names_the_first_mismatch(tmp_path, change, message, adm_reference):
    flags = {**json.loads(CONFIG.read_text()), **change}
    (tmp_path / "c.json").write_text(json.dumps(flags))
    with pytest.raises(DkdmError) as e:
        load_checkpoint_file(TEACHER, tmp_path / "c.json")
    assert message in str(e.value)


def test_convert_then_distill_from_an_adm_teacher(tmp_path, adm_reference, capsys):
    out = tmp_path / "adm_dir"
    assert main(["convert", "--checkpoint", str(TEACHER), "--config", str(CONFIG), "--out", str(out)]) == 0
    m = load_model(out)
    with torch.no_grad():
        assert rel(m(adm_reference["x"], adm_reference["t"]), adm_reference["model_output"]) < 1e-5
    # a checkpoint file without its flags is a one-line error
    assert main(["distill", "--teacher", str(TEACHER), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--teacher-config" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(TEACHER), "--teacher-config", str(CONFIG), "--student",
                 "unet:widths=8-16,layers=1,groups=4", "--pool", "iterative", "--batch", "2", "--steps", "2",
                 "--no-progress", "--no-report", "--out", str(run)]) == 0
    cfg = json.loads((run / "dkdm_model.json").read_text())
    assert cfg["sample_shape"] == [3, 32, 32] and cfg["teacher"] == str(TEACHER.resolve())


def test_adm_student_spec_builds_from_flags():
    from dkdm.diffusion import Schedule
    from dkdm.model import DiffusionModel

    m = DiffusionModel.build("adm:num_channels=32,num_res_blocks=1,channel_mult=1-2,attention_resolutions=4,num_head_channels=16",
                             (1, 8, 8), Schedule.named("cosine", 10))
    assert m.net(torch.randn(2, 1, 8, 8), torch.tensor([0, 9])).shape == (2, 2, 8, 8)
    assert any(k.endswith("qkv.weight") for k in m.net.state_dict())  # attention at 4x4 as asked


def test_convert_to_a_diffusers_unet_computes_the_same_function(tmp_path, adm_reference):
    from diffusers import DDPMPipeline

    r = adm_reference
    out = tmp_path / "pipe"
    assert main(["convert", "--checkpoint", str(TEACHER), "--config", str(CONFIG), "--format", "diffusers",
                 "--out", str(out)]) == 0
    pipe = DDPMPipeline.from_pretrained(out)
    with torch.no_grad():
        assert rel(pipe.unet(r["x"], r["t"]).sample, r["model_output"]) < 1e-5
        # and dkdm reads the directory back as a teacher with the same reverse step
        step = load_model(out).reverse(r["x"], r["t"])
    assert rel(step.mean, r["teacher_mean"]) < 1e-5


def test_legacy_attention_order_converts_too(tmp_path):
    """Needs no reference tensors: the reference config's flags are written out, so it runs in a clone."""
    from dkdm.nets.adm import ADMUNet
    from dkdm.formats.adm import to_diffusers
    from dkdm.nets.adm import parse_flags

    flags = parse_flags({"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "num_head_channels": 16,
                         "attention_resolutions": "16,8", "learn_sigma": True, "noise_schedule": "cosine",
                         "use_new_attention_order": False, "resblock_updown": False})
    torch.manual_seed(0)
    net = ADMUNet(flags).eval()
    for p in net.parameters():  # ADM zero-initialises output convs; perturb so every layer matters
        p.data.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert rel(to_diffusers(flags, net)(x, t).sample, net(x, t)) < 1e-5


def _einsum_attention(block, x):
    """ADM's QKVAttention / QKVAttentionLegacy as guided-diffusion writes them (einsum, softmax in at
    least float32: guided-diffusion's .float(), which would round a float64 check)."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(x))
    n, length = block.heads, qkv.shape[-1]
    ch = c // n
    if block.new_order:
        q, k, v = (z.reshape(b * n, ch, length) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * n, 3 * ch, length).split(ch, dim=1)
    scale = 1 / ch ** 0.25
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    w = torch.softmax(w.to(torch.promote_types(w.dtype, torch.float32)), dim=-1).type(w.dtype)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
    return (x + block.proj_out(h)).reshape(b, c, *spatial)


@pytest.mark.parametrize("new_order", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_attention_by_sdpa_equals_adm_einsum_attention(new_order, dtype, tol):
    from dkdm.nets.adm import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(64, 4, -1, new_order)
    block.norm = torch.nn.GroupNorm(32, 64)  # ADM's GroupNorm32 would round a float64 check to float32
    block.to(dtype)
    for p in block.parameters():  # ADM zero-initialises proj_out; make every weight matter
        p.data.normal_(0, 0.2)
    x = torch.randn(3, 64, 8, 8, dtype=dtype)
    with torch.no_grad():
        ours, want = block(x), _einsum_attention(block, x)
        attention_only = ours - x  # the residual is common to both: compare what attention adds
    assert rel(attention_only, want - x) < tol
    assert attention_only.std() > 0.1  # what attention adds is large and varies (not a vacuous comparison)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused attention kernels need a CUDA device (bench/gpu.sh)")
@pytest.mark.parametrize("new_order", [True, False])
def test_attention_on_cuda_in_bf16_follows_the_einsum_attention(new_order):
    """On a GPU, bf16 attention goes through the flash / memory-efficient kernels."""
    from dkdm.nets.adm import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(128, 4, -1, new_order).cuda()
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(8, 128, 16, 16, device="cuda")
    with torch.no_grad():
        want = _einsum_attention(block, x) - x
        with torch.autocast("cuda", torch.bfloat16):
            ours = block(x).float() - x
    assert rel(ours, want) < 3e-2
