"""What a distillation prints before it spends anything: the student, the settings the rules gave
with their reasons, the pool's size and cost (or, for distribution matching, that there is none)
and the report's size. ``plan`` is ``distillation``'s plan of the run."""

from __future__ import annotations

import sys

from .settings import DistillSettings


def _fake_steps(s: DistillSettings) -> str:
    n = s.fake_updates
    return "" if n == 1 else f" (the fake score stepped {n} times per generator step: {n - 1} more forward and backward)"


def announce(plan, s: DistillSettings) -> None:
    """The student, the rules' settings, the pool's size and cost and the report's, before any is spent."""
    from .defaults import describe

    teacher, T = plan.teacher, plan.teacher.schedule.num_steps
    print(_student_line(plan, s), file=sys.stderr)
    if plan.ruled:
        print(f"defaults: {describe(plan.ruled)}", file=sys.stderr)
    if plan.reference is None and teacher.decoder is None:
        from .data import builtin_names_of_shape

        names = builtin_names_of_shape(teacher.sample_shape)
        if names:
            print(f"the teacher records no data set, so the report has the data-free score only; its samples "
                  f"have the shape of {' / '.join(names)}: --reference NAME adds that data set's metrics",
                  file=sys.stderr)
    if plan.matching:
        print(f"no pool: the generator's own samples at its timesteps {plan.student.extra['sampler']['grid'] - 1} "
              f"and below, each judged by one teacher and one fake-score forward{_fake_steps(s)}; "
              f"training {plan.cfg.steps:,} steps, "
              f"{plan.cfg.steps * s.batch:,} teacher sample-forwards", file=sys.stderr)
    else:
        _announce_pool(plan, s)
    if plan.few and not plan.matching:
        print(plan.inherit_note, file=sys.stderr)
    if plan.few and not s.no_report:
        k = s.sampler_steps
        print(f"report: {plan.report.num:,} samples of the student at its {k} step{'s' * (k != 1)} and of the teacher "
              f"at {plan.report.steps or T} (the teacher's cached across runs: drawn once, most often by the distill run)",
              file=sys.stderr)
    else:
        print("report: none (--no-report)" if s.no_report else plan.report.describe(T), file=sys.stderr)


def _announce_pool(plan, s: DistillSettings) -> None:
    teacher, n = plan.teacher, plan.acc.num_processes
    print(
        f"pool: {s.pool}, {plan.size} entries x {list(teacher.sample_shape)} {s.pool_dtype} = "
        f"{plan.mem / 2**20:.1f} MiB; "
        + (f"{s.prep} preparation ~{plan.prep:,} teacher sample-steps" if plan.inherit_from is None else "no preparation")
        + f"; training {'up to ' * (s.steps == 'auto')}"
        f"{plan.cfg.steps:,} steps, {plan.cfg.steps * s.batch:,} teacher sample-forwards"
        + (f" (each of {n} processes: its own pool shard and batches)" if n > 1 else ""),
        file=sys.stderr,
    )


def _student_line(plan, s: DistillSettings) -> str:
    from .students import count_parameters, format_spec

    student, params = plan.student, f"{count_parameters(plan.student.net):,}"
    teacher = f"{count_parameters(plan.teacher.net):,}"
    if plan.few:
        fake = "the same student" if s.fake_from == "student" else "the teacher"
        how = (f"distribution matching (a fake score from {fake}; predicting epsilon from t = "
               f"{student.schedule.num_steps - 1})" if plan.matching else
               f"consistency distillation (predicting {student.prediction})")
        return (f"few-step student: {format_spec(student.spec)} from {s.student}, {params} parameters (teacher "
                f"{s.teacher}: {teacher}), {how} to sample in {s.sampler_steps} step{'s' * (s.sampler_steps != 1)}")
    name = s.student if student.spec is None else format_spec(student.spec)
    return f"student: {name}, {params} parameters (teacher: {teacher}){'' if s.student else '; --student SPEC picks another'}"
