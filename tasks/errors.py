"""Which failures are worth retrying.

A beam is retried for transient faults (the engine crashed, hung or printed
an error on a GPU that may be flaky); bad input fails at once, because a
second attempt on the same input would fail the same way and waste a GPU.
"""

from __future__ import annotations

from typing import Any


class PermanentError(Exception):
    """Bad or missing input: retrying cannot help. The message names case, beam and file."""


class ToolError(RuntimeError):
    """An external tool (interpreter or engine) failed; may be transient."""


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn for Prefect tasks: retry everything except PermanentError."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return False
