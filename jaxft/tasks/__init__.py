"""Tasks own the model head's loss, their data, evaluation outputs, metrics and final report;
the train loop (jaxft/train.py) and steps.py only see the `Task` interface (jaxft/tasks/base.py).
"""

import ml_collections

_TASKS = {
    "causal_lm": ("jaxft.tasks.causal_lm", "CausalLM"),
    "masked_lm": ("jaxft.tasks.masked_lm", "MaskedLM"),
    "classification": ("jaxft.tasks.classification", "SequenceClassification"),
    "token_classification": ("jaxft.tasks.token_classification", "TokenClassification"),
    "question_answering": ("jaxft.tasks.question_answering", "QuestionAnswering"),
}


def make_task(config: ml_collections.ConfigDict, labels: list[str] | None = None):
  """The task `config.task` names. `labels` (a trained run's label names, in id order) fixes
  the label set; without it a labelled task derives it from its data."""
  import importlib

  if config.task not in _TASKS:
    raise ValueError(f"config.task={config.task!r} is unknown; jaxft has: {', '.join(_TASKS)}")
  module, name = _TASKS[config.task]
  return getattr(importlib.import_module(module), name)(config, labels=labels)
