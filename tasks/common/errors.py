"""Which failures are worth retrying, and the one-line cause each failure states.

A beam is retried for transient faults (the engine crashed, hung or printed
an error on a GPU that may be flaky); bad input fails at once, because a
second attempt on the same input would fail the same way and waste a GPU.

A failure's message stands alone in any log (it names the case, the beam and
the file); its `cause` is the short reason a summary line shows once, after
the case and beam it already names ("engine crashed (SIGSEGV, exit 139)").
"""

from __future__ import annotations

from typing import Any


class MqiError(Exception):
    """An error with a standalone message and a one-line cause (default: the message's first line).

    `facts` are what the beam table shows of the run that failed: `gpu`, `attempts`, `seconds`.
    """

    def __init__(self, message: str, cause: str | None = None, facts: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.cause = cause if cause is not None else message.splitlines()[0] if message else ""
        self.facts = dict(facts or {})

    def __reduce__(self) -> tuple[type[MqiError], tuple[str, str, dict[str, float]]]:
        # States and results are pickled; the default reduce would drop the cause and the facts.
        return (type(self), (str(self), self.cause, self.facts))


class PermanentError(MqiError):
    """Bad or missing input: retrying cannot help. The message names case, beam and file."""


class ToolError(MqiError, RuntimeError):
    """An external tool (interpreter or engine) failed, or its host could not be reached; may be transient."""


def cause_of(error: BaseException, subject: str = "") -> str:
    """The one-line cause of `error`, without `subject` (e.g. "case P1: beam 2 (1G000:TX)") if it leads."""
    cause = getattr(error, "cause", None)
    if not isinstance(cause, str) or not cause:
        text = str(error) or type(error).__name__
        cause = text.splitlines()[0]
    if subject and cause.startswith(subject):
        cause = cause[len(subject) :].lstrip(" :")
    return cause


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn for Prefect tasks: retry everything except PermanentError."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return False
