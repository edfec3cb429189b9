"""Errors that are the user's fault, and how to find them inside Ray's wrappers."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, files, data, artifacts).

    The CLI prints its message as one line and exits with code 2; anything else is a
    bug and keeps its traceback.
    """


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
            # remote traceback; the original message is in args.
            return UserError(str(e.args[0]) if e.args else str(e))
        stack.extend([e.__cause__, e.__context__])
        stack.append(getattr(e, "cause", None))
        stack.append(getattr(e, "controller_failure", None))
        stack.extend((getattr(e, "worker_failures", None) or {}).values())
    return None
