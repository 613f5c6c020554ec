"""Expected failures end in a sentence, bugs in a traceback: one rule for every stage script and the CLI.

An error a person can fix (a bad params key, a missing API key, a missing image, a
server that does not start) subclasses :class:`UserError`; its message names the file,
key or study and says what to do. :func:`for_people` prints that message and exits
non-zero; anything else is a bug and keeps its traceback. ``MEDFILIP_DEBUG=1`` (or
``medfilip --debug``) shows the traceback of expected errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

DEBUG_ENV = "MEDFILIP_DEBUG"
EXIT_CODE = 1


class UserError(Exception):
    """An expected failure whose message is written for people (mixed into each module's own error)."""


def is_for_people(exc: BaseException) -> bool:
    """Whether ``exc`` is an expected failure: a :class:`UserError`, or a missing input file."""
    return isinstance(exc, (UserError, FileNotFoundError))


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def message(exc: BaseException) -> str:
    """The sentence printed for an expected failure."""
    if isinstance(exc, FileNotFoundError):
        # OSError sets .filename; pyarrow raises FileNotFoundError(path) with the bare path.
        path = exc.filename if exc.filename is not None else (
            exc.args[0] if len(exc.args) == 1 and " " not in str(exc.args[0]) else None)
        if path is not None:
            return (f"{path} does not exist. If it is a pipeline output, run the stage that writes it "
                    "(dvc repro); if it is an input, check its path in params.yaml.")
    return str(exc)


@contextlib.contextmanager
def for_people(name: str) -> Iterator[None]:
    """Run a stage or command body: an expected failure prints ``name: <message>`` and exits 1."""
    try:
        yield
    except Exception as exc:
        if not is_for_people(exc) or debug_enabled():
            raise
        print(f"{name}: {message(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None
