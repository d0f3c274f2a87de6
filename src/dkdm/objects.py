"""Teachers and students handed to the library as Python objects (``dkdm.distill(teacher=model,
student=net)``) rather than named by a path or spec: what run.json records for them, and the
student model an ``nn.Module`` becomes.

A teacher object is recorded as ``python:<network class>@<digest of its weights>``, so a resumed
run checks that it is given the same teacher; a student object as ``python:<class>`` (its weights
come from the run's checkpoints). Neither can be loaded back from run.json alone, so such a run
resumes from Python, given the same objects again.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import DkdmError
from .metrics.teacher_fd import weights_fingerprint
from .model import DiffusionModel

#: How run.json records a teacher or student given as an object.
OBJECT_PREFIX = "python:"


def is_object_reference(value) -> bool:
    return isinstance(value, str) and value.startswith(OBJECT_PREFIX)


def take_objects(settings: dict) -> tuple[dict, dict]:
    """``settings`` with a teacher or student object replaced by the reference run.json records,
    and the objects by role ({"teacher": DiffusionModel, "student": DiffusionModel | nn.Module})."""
    settings, objects = dict(settings), {}
    teacher = settings.get("teacher")
    if isinstance(teacher, nn.Module):
        if not isinstance(teacher, DiffusionModel):
            raise DkdmError("teacher= takes a DiffusionModel (a network with its schedule and sample shape: "
                            "dkdm.DiffusionModel(net, Schedule.named('linear', 1000), (3, 32, 32), ...)) or a "
                            f"reference (a path, Hub id or builtin:NAME), not a bare {type(teacher).__name__}")
        objects["teacher"] = teacher
        settings["teacher"] = f"{OBJECT_PREFIX}{type(teacher.net).__name__}@{weights_fingerprint(teacher.net)}"
    student = settings.get("student")
    if isinstance(student, nn.Module):
        objects["student"] = student
        net = student.net if isinstance(student, DiffusionModel) else student
        settings["student"] = f"{OBJECT_PREFIX}{type(net).__qualname__}"
    return settings, objects


def student_from_object(obj: nn.Module, teacher: DiffusionModel) -> DiffusionModel:
    """The student model of a student given as an object: a DiffusionModel as it is (it must model
    the teacher's samples over its steps), or a network ``net(x, t[, y])`` wrapped with the
    teacher's schedule, sample shape, classes and x0 clipping, predicting epsilon, its variance read
    from its output channels (C: fixed_small, 2C: learned_range)."""
    if isinstance(obj, DiffusionModel):
        if tuple(obj.sample_shape) != tuple(teacher.sample_shape) or obj.schedule.num_steps != teacher.schedule.num_steps:
            raise DkdmError(f"the student models samples of shape {list(obj.sample_shape)} over "
                            f"{obj.schedule.num_steps} steps, the teacher {list(teacher.sample_shape)} over "
                            f"{teacher.schedule.num_steps}: build it on the teacher's shape and schedule")
        return obj
    channels = teacher.sample_shape[0]
    out = _output_channels(obj, teacher)
    if out not in (channels, 2 * channels):
        raise DkdmError(f"the student network outputs {out} channels; a student of this teacher outputs {channels} "
                        f"(epsilon, a fixed variance) or {2 * channels} (epsilon and a learned variance)")
    return DiffusionModel(obj, teacher.schedule, teacher.sample_shape, prediction="epsilon",
                          variance="learned_range" if out == 2 * channels else "fixed_small",
                          clip_x0=teacher.clip_x0, num_classes=teacher.num_classes, null_class=teacher.null_class,
                          decoder=teacher.decoder)


def _output_channels(net: nn.Module, teacher: DiffusionModel) -> int:
    """The channels of one forward of ``net`` on a zero sample at t = 0 (with label 0 for a
    class-conditional teacher); a one-line error where the call fails."""
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *teacher.sample_shape, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            out = net(x, t, torch.zeros(1, dtype=torch.long, device=device)) if teacher.num_classes else net(x, t)
    except Exception as e:  # a user's network: any failure is theirs to read in one line
        raise DkdmError(f"the student network failed on a sample of the teacher's shape "
                        f"{[1, *teacher.sample_shape]} ({e.__class__.__name__}: {e}); it is called as "
                        f"net(x, t{', y' if teacher.num_classes else ''})")
    if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != tuple(teacher.sample_shape[1:]) or out.shape[0] != 1:
        raise DkdmError(f"the student network must return a tensor shaped like its input with C or 2C channels; "
                        f"got {getattr(out, 'shape', type(out).__name__)} for input {[1, *teacher.sample_shape]}")
    return int(out.shape[1])
