"""Continual learning over a sequence of class-incremental stages (docs/continual-learning.md):
naive fine-tuning, EWC, experience replay and one LoRA adapter per stage, with the forgetting
report (accuracy matrix, average accuracy, backward transfer)."""

from jaxft.lifelong.stages import STRATEGIES, Options
from jaxft.lifelong.workflow import run_continual, run_stages

__all__ = ["STRATEGIES", "Options", "run_continual", "run_stages"]
