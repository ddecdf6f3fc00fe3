"""Hyperparameter search over training runs (python -m jaxft.sweep): the search space
(space.py), the Optuna study and its trials (study.py), the table and plot (report.py)."""

from jaxft.sweeping.space import SpecError, parse, parse_all
from jaxft.sweeping.study import objective_metric, open_study, run_sweep

__all__ = ["SpecError", "objective_metric", "open_study", "parse", "parse_all", "run_sweep"]
