"""User-facing errors: what went wrong, where, and how to fix it, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a config value).

    The CLI prints the message on one line per problem and exits with status 2; nothing
    else is printed. Messages name the file, key or value and say how to fix it.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
