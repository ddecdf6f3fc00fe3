"""Best-checkpoint tracking (early stopping) and the checks a resumed run makes before it
trusts its checkpoints: the same model shape, the same frozen base."""

import dataclasses
import os

import numpy as np

from jaxft.models import registry
from jaxft.run import state as state_lib
from jaxft.run import workdir as workdir_lib


class BestTracker:
  """The best validation metric so far, its step, and evaluations since it improved.

  Ties on the metric (accuracy over a few hundred examples ties often) go to the lower
  validation loss: equally many right answers, given with more confidence."""

  def __init__(self, metric: str, mode: str, patience: int, state: dict | None = None):
    if mode not in ("max", "min"):
      raise ValueError(f"config.early_stopping.mode={mode!r} must be 'max' or 'min'")
    self.metric, self.mode, self.patience = metric, mode, patience
    state = state or {}
    self.best = state.get("best")
    self.best_step = state.get("best_step")
    self.bad_evals = state.get("bad_evals", 0)
    self.best_loss = state.get("best_loss")

  @classmethod
  def from_config(cls, config, task, saved: dict | None = None) -> "BestTracker":
    """config.early_stopping (its empty fields: the task's default metric), resumed from the
    tracker state a checkpoint saved."""
    es = config.get("early_stopping") or {}
    metric, mode = task.default_metric
    return cls(es.get("metric") or metric, es.get("mode") or mode, int(es.get("patience", 0)),
               saved)

  def update(self, step: int, val: dict) -> bool:
    """Records an evaluation; True if it is a new best."""
    if self.metric not in val:
      raise ValueError(f"config.early_stopping.metric={self.metric!r} is not a validation "
                       f"metric of this task; choose one of {sorted(val)}")
    value, loss = val[self.metric], val.get("loss")
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    if (not better and value == self.best and self.metric != "loss" and loss is not None
        and self.best_loss is not None):
      better = loss < self.best_loss
    if better:
      self.best, self.best_step, self.bad_evals, self.best_loss = value, step, 0, loss
    else:
      self.bad_evals += 1
    return better

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_evals >= self.patience

  def state(self) -> dict:
    return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
            "bad_evals": self.bad_evals, "best_loss": self.best_loss}


# config.model fields that change how a step computes, not the arrays a checkpoint holds.
_COMPUTE_ONLY = ("dtype", "param_dtype", "remat", "attention_impl", "embd_pdrop", "attn_pdrop",
                 "resid_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "classifier_dropout")


def model_shape_fields(model_cfg) -> dict:
  """The model settings that decide the checkpoint's arrays (defaults filled in, so a config
  saved before a field existed compares as that field's default)."""
  fields = dataclasses.asdict(registry.model_config(model_cfg))
  return {"family": model_cfg.get("family", "gpt2"),
          **{k: v for k, v in fields.items() if k not in _COMPUTE_ONLY}}


def check_same_model(workdir: str, config) -> None:
  """A resumed run must build the model its checkpoints hold: a changed layer count, width or
  scan_layers (stacked vs per-layer params) would otherwise fail deep inside Orbax."""
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    return
  saved = model_shape_fields(workdir_lib.load_config(workdir).model)
  now = model_shape_fields(config.model)
  changed = {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
             if saved.get(k) != now.get(k)}
  if changed:
    fields = ", ".join(f"config.model.{k}={new!r} (the checkpoints' {old!r})"
                       for k, (old, new) in sorted(changed.items()))
    raise ValueError(f"--workdir={workdir} holds checkpoints of another model: {fields}. Resume "
                     "with the model settings it was trained with, or train into a new workdir "
                     f"with --config.init_from={workdir}, which converts its weights (e.g. "
                     "between scan_layers settings)")


def check_base(meta: dict, frozen, config) -> None:
  """A resumed PEFT run's frozen base (rebuilt from config.init_from) must be the one it was
  trained on: its checksum is in the checkpoint's metadata."""
  saved = meta.get("base_fingerprint")
  if saved is None or not frozen:
    return
  now = state_lib.fingerprint(frozen)
  if not np.isclose(now, saved, rtol=1e-6, atol=0.0):
    raise ValueError(f"config.init_from={config.init_from!r} no longer holds the base model this "
                     f"run was trained on (checksum {now:.6g}, the checkpoint's {saved:.6g}); "
                     "point config.init_from at the original base model to resume")
