"""Tasks own the model head's loss, their data, evaluation outputs, metrics and final report;
the train loop (jaxft/training/) and the steps (jaxft/run/steps.py) only see the `Task`
interface (jaxft/tasks/base.py). A new objective is a Task subclass and one line here."""

import ml_collections

from jaxft.tasks.base import Task
from jaxft.tasks.causal_lm import CausalLM
from jaxft.tasks.classification import SequenceClassification
from jaxft.tasks.dpo import PreferenceTuning
from jaxft.tasks.masked_lm import MaskedLM
from jaxft.tasks.question_answering import QuestionAnswering
from jaxft.tasks.sft import InstructionTuning
from jaxft.tasks.token_classification import TokenClassification

# config.task -> the Task class.
_TASKS = {cls.name: cls for cls in (CausalLM, MaskedLM, SequenceClassification,
                                    TokenClassification, QuestionAnswering, InstructionTuning,
                                    PreferenceTuning)}

__all__ = ["Task", "make_task", "task_class"]


def task_class(name: str) -> type[Task]:
  if name not in _TASKS:
    raise ValueError(f"config.task={name!r} is unknown; jaxft has: {', '.join(_TASKS)}")
  return _TASKS[name]


def make_task(config: ml_collections.ConfigDict, labels: list[str] | None = None) -> Task:
  """The task `config.task` names. `labels` (a trained run's label names, in id order) fixes
  the label set; without it a labelled task derives it from its data."""
  return task_class(config.task)(config, labels=labels)
