"""Errors that are the user's fault, and how to find them inside Ray's wrappers."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, files, data, artifacts).

    The CLI prints its message as one line and exits with code 2; anything else is a
    bug and keeps its traceback.
    """

    def __init__(self, message: str):
        super().__init__(message)
        # Apart from args, which Ray Data extends with retry advice on a task's way out.
        self.message = message


def find_user_error(exc: BaseException) -> UserError | None:
    """Return the first UserError inside ``exc``.

    Errors raised in Ray Data tasks or Train workers reach the driver wrapped (a
    ``RayTaskError`` chain inside a ``WorkerGroupError`` inside a ``ControllerError``);
    the user's message is somewhere below.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            # Ray re-raises task errors as a dual-class copy whose str() carries the
            # remote traceback; it keeps the original's attributes.
            return UserError(e.message)
        stack.extend([e.__cause__, e.__context__])
        stack.append(getattr(e, "cause", None))
        stack.append(getattr(e, "controller_failure", None))
        stack.extend((getattr(e, "worker_failures", None) or {}).values())
    return None


def one_line(exc: BaseException) -> str:
    """What ended a Ray task or Tune trial, in one line: the user's message inside
    ``exc``, else its last line (Ray's text of a remote error is its whole traceback)."""
    user = find_user_error(exc)
    if user is not None:
        return " ".join(user.message.split())
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
