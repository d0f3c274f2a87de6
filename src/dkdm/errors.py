"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class DkdmError(Exception):
    """A problem with what the user asked for (a path, a spec, a number), not a bug in dkdm."""
