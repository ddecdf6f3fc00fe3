"""Structured trimming: attention heads, MLP neurons and layers removed by importance over a
calibration set (masks.py: the masks; scores.py: first-order Taylor scores; prune.py: the plan
and the smaller param tree; workflow.py: a run in, a trimmed workdir out, optional recovery;
speed.py: inference speed of runs side by side). docs/trimming.md has the details."""

from jaxft.trimming.prune import Plan, apply_plan, make_plan
from jaxft.trimming.workflow import trim

__all__ = ["Plan", "apply_plan", "make_plan", "trim"]
