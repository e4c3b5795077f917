"""The one exception type meant for users: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, wrong order of stages).

    The message must name the thing (field, file, stage) and say how to fix it.
    """
