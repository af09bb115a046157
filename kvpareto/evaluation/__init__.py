"""One trial in named steps, its typed result, calibration data and the lm-eval bridge.

Importing this package registers the `lm-eval:` task family, so `get_task` from here resolves
every task name the command line accepts.
"""

from kvpareto.evaluation.lmeval import task as _lmeval_task  # noqa: F401  (registers lm-eval:)
from kvpareto.tasks import get_task

__all__ = ["get_task"]
