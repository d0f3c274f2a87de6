"""The one exception type for what stops a command cleanly: the CLI prints its message on one line
and exits with its ``exit_code`` (2 for user mistakes; subclasses for failed runs have their own)."""


class DkdmError(Exception):
    """A problem with what the user asked for (a path, a spec, a number), not a bug in dkdm."""

    exit_code = 2


class TrainingDiverged(DkdmError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""

    exit_code = 3
