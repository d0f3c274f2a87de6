"""The default student: the teacher's family at about half its parameters (every width / sqrt(2)),
for every kind of teacher, with the student-steps view of the teacher giving the same one (issues 15, 16)."""

import pytest
import torch

import tiny_teachers as tt
from dkdm.diffusion import Schedule
from dkdm.model import DiffusionModel
from dkdm.students import count_parameters, default_student_spec, format_spec, parse_spec, student_spec


def _ratio(teacher, spec):
    student = DiffusionModel.build(spec, teacher.sample_shape, teacher.schedule, variance=teacher.variance)
    return count_parameters(student.net) / count_parameters(teacher.net)


def test_adm_teacher_gets_an_adm_student_at_the_nearest_fitting_width():
    """A CIFAR-10-sized ADM (52.5M parameters at 128 channels, as the paper's 57M teacher): 128/sqrt(2)
    = 90.5 channels, but 64-channel heads allow only multiples of 64 at every level, and 64 is the
    nearer (13M parameters: the paper's student has 14M)."""
    flags = "adm:num_channels=128,num_res_blocks=3,num_head_channels=64,dropout=0.3,learn_sigma=true"
    teacher = DiffusionModel.build(flags, (3, 32, 32), Schedule.named("cosine", 10))
    spec = default_student_spec(teacher)
    assert spec["type"] == "adm" and spec["num_channels"] == 64 and spec["num_res_blocks"] == 3
    assert spec["dropout"] == 0.3 and not spec["class_cond"]
    assert 0.2 < _ratio(teacher, spec) < 0.3


def test_adm_widths_stay_divisible_as_adm_needs():
    # 192 channels at mult 1,2,3,4 with 64-channel heads: 192/sqrt(2) = 136 would give 136-channel levels
    # (not heads of 64); 128 is the nearest that fits (levels 128, 256, 384, 512)
    teacher = DiffusionModel.build("adm:num_channels=192,num_head_channels=64,channel_mult=1-2-3-4",
                                   (3, 64, 64), Schedule.named("cosine", 10))
    assert default_student_spec(teacher)["num_channels"] == 128
    tiny = DiffusionModel.build(tt.ADM_FLAGS | {"type": "adm"}, (3, 8, 8), Schedule.named("cosine", 10))
    assert default_student_spec(tiny)["num_channels"] == 32  # GroupNorm's 32 groups: no narrower ADM exists


def test_diffusers_unet_pipeline_teacher_gets_a_unet_student(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    # google/ddpm-cifar10-32's layout, smaller: attention at the second level
    unet = UNet2DModel(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "p")
    from dkdm.formats import load_model

    teacher = load_model(tmp_path / "p")
    spec = default_student_spec(teacher)
    # 32-64-64 / sqrt(2) = 22.6-45.3-45.3: 16 groups would round them to 16-48-48 (29% off), 8 to 24-48-48
    assert spec == parse_spec("unet:widths=24-48-48,layers=2,attn=1,groups=8")
    assert 0.4 < _ratio(teacher, spec) < 0.65
    assert default_student_spec(teacher.respaced(5)) == spec  # the pipeline's unet is found behind the view


@pytest.mark.parametrize("kind, want", [
    ("dit-pipeline", "dit:depth=1,width=12,heads=1,classes=4"),
    ("dkdm-dit-cond", "dit:depth=1,width=12,heads=1,classes=3"),
    ("dkdm-mlp", "mlp:width=24,depth=1"),
    ("dkdm-unet", "unet:widths=6-12,groups=2"),
    ("ldm", "unet:widths=6-12,groups=2"),
])
def test_default_student_per_teacher_kind(kind, want, tmp_path):
    teacher = tt.load(tt.make(kind, tmp_path))
    spec = default_student_spec(teacher)
    assert format_spec(spec) == want and parse_spec(format_spec(spec)) == spec
    assert _ratio(teacher, spec) < 0.7  # tiny networks: embeddings and heads that do not narrow weigh more
    # --student-steps views the teacher respaced: the same student (it used to become a unet)
    assert default_student_spec(teacher.respaced(5)) == spec
    assert DiffusionModel.student_of(teacher.respaced(5)).spec == spec


def test_dit_narrows_heads_and_width_by_sqrt2():
    # DiT-S's width and heads (384, 6: head size 64), two blocks deep: 6/sqrt(2) -> 4 heads, 384/sqrt(2) = 271.5
    # -> 272 (a multiple of 4 heads and of 4 for the sin-cos positions)
    teacher = DiffusionModel.build("dit:patch=2,depth=2,width=384,heads=6", (4, 16, 16), Schedule.named("cosine", 10))
    spec = default_student_spec(teacher)
    assert (spec["width"], spec["heads"], spec["depth"], spec["patch"]) == (272, 4, 2, 2)
    assert 0.4 < _ratio(teacher, spec) < 0.6


def test_uvit_teacher_gets_a_uvit_student_of_about_half_its_parameters():
    # 6 heads of 64 -> 4 heads; 384 / sqrt(2) = 271.5 -> 272 (a multiple of 4 heads); depth and patch kept
    teacher = DiffusionModel.build("uvit:patch=2,depth=5,width=384,heads=6", (4, 16, 16), Schedule.named("cosine", 10))
    spec = default_student_spec(teacher)
    assert spec["type"] == "uvit" and (spec["width"], spec["heads"], spec["depth"], spec["patch"]) == (272, 4, 5, 2)
    assert 0.4 < _ratio(teacher, spec) < 0.6


def test_custom_module_teacher_gets_the_smallest_default_of_its_data():
    class Net(torch.nn.Module):
        def forward(self, x, t):
            return x

    sched = Schedule.named("linear", 10)
    images = DiffusionModel(Net(), sched, (3, 8, 8), variance="fixed_small", num_classes=5)
    assert default_student_spec(images) == parse_spec("unet:classes=5")
    assert default_student_spec(DiffusionModel(Net(), sched, (2,), variance="fixed_small")) == parse_spec("mlp")


def test_named_spec_inherits_the_teachers_classes_unless_it_names_them():
    sched = Schedule.named("linear", 10)
    teacher = DiffusionModel.build("unet:widths=8-16,groups=4,classes=6", (3, 8, 8), sched)
    assert student_spec(teacher, "dit:width=16,heads=2")["classes"] == 6
    assert student_spec(teacher, "dit:width=16,heads=2,classes=0")["classes"] == 0
    adm = student_spec(teacher, "adm:num_channels=32")
    assert adm["class_cond"] and adm["num_classes"] == 6  # an ADM student conditions too
    assert not student_spec(teacher, "adm:num_channels=32,class_cond=false")["class_cond"]
    student = DiffusionModel.student_of(teacher, "adm:num_channels=32,channel_mult=1-2,attention_resolutions=4")
    assert student.num_classes == 6 and student.schedule is teacher.schedule
