"""Errors a user can act on.

Anything raised as a :class:`UserError` reaches the terminal as one line
(``error: <message>``) and a non-zero exit; tracebacks are for bugs only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input: a file, a field, a config value or a credential."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration key or value."""


class StorageError(UserError):
    """A store location that cannot be reached, read or written."""

    exit_code = 3


class StoreError(UserError):
    """A store whose manifest or shards do not match the data contract."""

    exit_code = 4


class SourceError(UserError):
    """A release being ingested (raw NSD, MindEye2's) with a missing, malformed or changed file."""

    exit_code = 5


class TrackingUnavailable(UserError):
    """The MLflow tracking server or model registry does not answer."""

    exit_code = 6


class Diverged(UserError):
    """Training produced a non-finite loss: the run stops; its last good checkpoint stays."""

    exit_code = 7


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type's name), for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def user_error_in(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind an exception Ray raised for a failed task, actor or training worker.

    Walks ``cause`` / ``__cause__`` chains and Ray Train's ``worker_failures`` / ``controller_failure``;
    where Ray kept only a traceback's text (Ray Data UDFs, some worker failures), the last
    ``raydecode.errors.X: message`` line is turned back into that error.
    """
    import re
    import sys

    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    texts: list[str] = []
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            inner = getattr(e, "cause", None)  # Ray's RayTaskError(X) is an X too, its text a traceback: take X
            return inner if isinstance(inner, UserError) else e
        texts.append(str(e))
        nxt = [getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            nxt += [failures[rank] for rank in sorted(failures, reverse=True)]
        stack += [n for n in nxt if isinstance(n, BaseException)]
    module = sys.modules[__name__]
    for text in texts:
        found = re.findall(r"^raydecode\.errors\.(\w+): (.+)$", text, flags=re.MULTILINE)
        if found:
            name, message = found[-1]
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, UserError):
                return cls(message)
    return None


@contextmanager
def user_errors_from_ray() -> Iterator[None]:
    """Around a call that waits on Ray (``ray.get``, a dataset's iteration, ``trainer.fit``): the
    :class:`UserError` a task, actor or worker raised reaches the caller as itself, a one-line error with its
    exit code, instead of Ray's wrapper and remote traceback; anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise
