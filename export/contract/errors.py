"""The project's one exception type for mistakes a user can make (shared by every stage)."""


class NFormerError(Exception):
    """A user-facing error: says what was expected, what was found and what to do.

    Command-line entry points print ``str(err)`` on one line and exit non-zero.
    """


class CheckpointError(NFormerError):
    """A checkpoint is missing, unreadable, unsafe or of another architecture."""


class InputError(NFormerError):
    """Features, landmarks, crops or paths that do not fit the model's contract."""
