"""User-facing errors: what went wrong, where, and how to fix it, without a traceback."""

import os
from pathlib import Path


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


def output_path_problem(path, name: str, kind: str = "dir") -> str | None:
    """Why ``path`` cannot be written as a ``kind`` ("dir" or "file"), or None; creates nothing.

    ``name`` is the flag or key that gave the path (``--output``, ``output_dir``): every
    message starts with it and the path, and says what to choose instead. Refused: an
    empty path (it would mean the current directory), a directory where a file goes or a
    file where a directory goes, a path under an existing file, and a place this user
    cannot write into.
    """
    where = f"{name} {path}" if name.startswith("-") else f"{name}: {path}"
    if path is None or not str(path).strip():
        return f"{name}: empty; give a {'directory' if kind == 'dir' else 'file'} path"
    p = Path(path)
    if p.exists():
        if kind == "dir" and not p.is_dir():
            return f"{where} exists and is a file; choose a directory path"
        if kind == "file" and p.is_dir():
            return f"{where} is a directory; give a file path (e.g. {p / 'out.json'})"
        target = p if kind == "dir" else p.parent
        if not os.access(target, os.W_OK | os.X_OK):
            return f"{where}: cannot write into {target}; choose a writable path"
        return None
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{where} lies under {parent}, which is a file; choose a path outside it"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{where}: cannot create it in {parent} (no write permission); choose a writable path"
            return None
    return None


def require_output_path(path, name: str, kind: str = "dir"):
    """The ``Path`` of ``path`` once :func:`output_path_problem` finds nothing wrong with it."""
    problem = output_path_problem(path, name, kind)
    if problem:
        raise UserError(problem)
    return Path(path)
