"""Ensembles of fine-tuned runs (classification, token classification, QA): several workdirs
scored as one model by jaxft.evaluate, jaxft.predict and the server.

One featurised batch feeds every member, so the members must featurise alike: the same task,
the same row length (config.seq_len), model family (special tokens), packing, QA windows and
tokenizer (vocabulary, normaliser, pre-tokeniser, post-processor). Label sets must be equal as
sets; a member whose labels are in another order is mapped by name onto the first member's
order (which the outputs use). Anything else is refused naming both workdirs and the field.

Combination, per output position (a text; a token; a QA start or end position):
  mean  the average of the members' probabilities (softmax of each member's logits; QA: softmax
        over each window's positions for start and for end)
  vote  classification / NER: each member votes its argmax; most votes wins, ties go to the
        higher averaged probability. The distribution reported is (votes + mean probability) /
        (members + 1): its argmax is the vote, and it is a proper distribution (loss finite)
The combined log-probabilities take the place of the first member's logits in its own
eval_outputs, so summarize / report / predictions (metrics, report JSON, predict lines, served
results) are exactly a single model's format: `Ensemble` reads as a loader.Run.
"""

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.run import evaluation, loader

log = logging.getLogger("jaxft")

MODES = ("mean", "vote")
ENSEMBLE_FILE = "ensemble.json"  # what an ensemble evaluation's report directory records
# Fields the featurisation reads: members must agree on them (config paths).
_FEATURE_FIELDS = ("seq_len", "model.family", "data.packing", "data.pack_slots")
_QA_FIELDS = ("data.doc_stride", "data.max_question_len", "data.max_answer_len",
              "data.version_2_with_negative")
# Where a member's training data came from: evaluation scores the first member's split, which
# another member may have trained on if these differ (a warning, not an error).
_DATA_FIELDS = ("data.dataset", "data.train", "data.validation", "data.test", "data.split_seed",
                "data.validation_fraction", "data.test_fraction")
_TINY = float(np.finfo(np.float32).tiny)  # log(0) would turn losses of padding rows into NaN


def split_paths(values: str | Sequence[str]) -> list[str]:
  """--workdir values (repeated and/or comma-separated) -> the run paths, in order."""
  values = [values] if isinstance(values, str) else list(values)
  return [p.strip() for v in values for p in v.split(",") if p.strip()]


@dataclasses.dataclass
class Ensemble:
  """Several runs read as one loader.Run (path, config, task, variables, labels)."""

  members: list[loader.Run]
  mode: str
  task: object  # the first member's task, its logits combining every member's (see below)

  @property
  def path(self) -> str:
    return ",".join(m.path for m in self.members)

  @property
  def name(self) -> str:
    """The model's name: the members' directory names joined by '+'."""
    return "+".join(os.path.basename(os.path.normpath(m.path)) for m in self.members)

  @property
  def config(self):
    return self.members[0].config

  @property
  def variables(self) -> list:
    return [m.variables for m in self.members]

  @property
  def labels(self):
    return self.task.labels


def _field(config, dotted: str):
  node = config
  for key in dotted.split("."):
    node = node.get(key) if hasattr(node, "get") else None
    if node is None:
      return None
  return node


def check_members(runs: Sequence, mode: str) -> None:
  """Raises ValueError naming both workdirs and the field where a member cannot join."""
  if mode not in MODES:
    raise ValueError(f"--ensemble={mode!r}: give one of {', '.join(MODES)}")
  first = runs[0]
  for run in runs:
    if not run.task.prediction_fields:
      raise ValueError(f"{run.path} holds a {run.config.task} model; ensembles combine "
                       "classification, token classification and QA runs")
  if mode == "vote" and first.task.name == "question_answering":
    raise ValueError("--ensemble=vote: QA answers are spans, not labels to vote on; use "
                     "--ensemble=mean (average start/end probabilities)")
  for run in runs[1:]:
    _check_pair(first, run)


def _refuse(first, run, field: str, a, b, fix: str):
  raise ValueError(f"ensemble members disagree on {field}: {first.path} has {a!r}, "
                   f"{run.path} has {b!r}; {fix}")


def _check_pair(first, run) -> None:
  if run.task.name != first.task.name:
    _refuse(first, run, "config.task", first.task.name, run.task.name,
            "members must solve the same task")
  if first.task.has_labels and set(run.labels) != set(first.labels):
    only_a = sorted(set(first.labels) - set(run.labels))
    only_b = sorted(set(run.labels) - set(first.labels))
    _refuse(first, run, "the label set (labels.json)", first.labels, run.labels,
            f"labels only in the first: {only_a}, only in the other: {only_b}; members must "
            "predict the same labels")
  qa = first.task.name == "question_answering"
  for field in _FEATURE_FIELDS + (_QA_FIELDS if qa else ()):
    a, b = _field(first.config, field), _field(run.config, field)
    if a != b:
      _refuse(first, run, f"config.{field}", a, b, "one featurised batch feeds every member, "
              "so they must featurise alike (ensemble runs trained with the same data settings)")
  if run.task.tokenizer.spec() != first.task.tokenizer.spec():
    _refuse(first, run, "the tokenizer (config.data.tokenizer)",
            first.config.data.get("tokenizer"), run.config.data.get("tokenizer"),
            "members must share a tokenizer (vocabulary and text processing)")


def data_differences(runs: Sequence) -> list[str]:
  """Data-source fields where a member differs from the first (evaluation scores the first
  member's split, which such a member may have trained on)."""
  return [f"config.{f}: {runs[0].path}={_field(runs[0].config, f)!r}, "
          f"{r.path}={_field(r.config, f)!r}"
          for r in runs[1:] for f in _DATA_FIELDS
          if _field(r.config, f) != _field(runs[0].config, f)]


# -- combination (inside jit) ------------------------------------------------------------------

def _log(p):
  return jnp.log(jnp.maximum(p, _TINY))


def combine(log_probs: Sequence, mode: str):
  """Members' log-probabilities [..., C] -> the ensemble's log-probabilities [..., C]."""
  probs = jnp.stack([jnp.exp(lp) for lp in log_probs])  # [M, ..., C]
  mean = jnp.mean(probs, axis=0)
  if mode == "mean":
    return _log(mean)
  classes = probs.shape[-1]
  votes = sum(jax.nn.one_hot(jnp.argmax(lp, -1), classes, dtype=mean.dtype) for lp in log_probs)
  # Votes are whole numbers and the mean lies in (0, 1]: votes + mean ranks by votes, then by
  # mean (a label with more votes has a member's top probability, so its mean is > 0).
  return _log((votes + mean) / (len(log_probs) + 1))


def window_log_softmax(logits, segment_ids, windows: int):
  """QA start/end logits [B, T] -> log-probabilities over each window's positions (segment ids
  1..windows: a packed row holds several); padding positions get log(tiny)."""
  logits = logits.astype(jnp.float32)
  masks = segment_ids[:, None, :] == jnp.arange(1, windows + 1)[:, None]  # [B, K, T]
  lse = jax.nn.logsumexp(jnp.where(masks, logits[:, None, :], -jnp.inf), axis=-1)  # [B, K]
  token_lse = jnp.sum(jnp.where(masks, lse[:, :, None], 0.0), axis=1)
  return jnp.where(segment_ids > 0, logits - token_lse, jnp.log(_TINY))


class _EnsembleLogits:
  """Mixed in before the first member's task class: `logits` runs every member on the batch
  and returns the combined log-probabilities, so the task's own eval_outputs (its loss terms,
  argmaxes and outputs) runs unchanged on the ensemble. `variables` is the members' list.
  A subclass rather than a wrapper, so a copy's packing / tokenizer (the server sets them)
  is what its own methods read."""

  member_tasks: list
  label_orders: list  # per member: its index of each of the first member's labels, or None
  ensemble_mode: str

  def logits(self, variables, batch, rng=None, deterministic=True):
    del rng, deterministic  # inference only: no dropout
    packed = {"slots": self.slots} if self.packing and self.pools_per_slot else {}
    outs = [task.apply(v, batch["inputs"], batch["segment_ids"], batch["token_types"],
                       batch["positions"], **packed)
            for task, v in zip(self.member_tasks, variables, strict=True)]
    if self.name == "question_answering":  # (start, end): per-window position distributions
      windows = self.slots if self.packing else 1
      return tuple(combine([window_log_softmax(o[i], batch["segment_ids"], windows)
                            for o in outs], "mean") for i in (0, 1))
    log_probs = [jax.nn.log_softmax(o.astype(jnp.float32), -1) if order is None
                 else jax.nn.log_softmax(o.astype(jnp.float32), -1)[..., jnp.asarray(order)]
                 for o, order in zip(outs, self.label_orders)]
    return combine(log_probs, self.ensemble_mode)


@functools.cache
def _ensemble_class(cls):
  return type(f"Ensemble{cls.__name__}", (_EnsembleLogits, cls), {})


def make_ensemble(runs: Sequence, mode: str = "mean") -> Ensemble:
  """Opened runs -> their ensemble (checked: check_members)."""
  runs = list(runs)
  if not runs:
    raise ValueError("an ensemble needs at least one run (--workdir)")
  check_members(runs, mode)
  lead = runs[0].task
  task = object.__new__(_ensemble_class(type(lead)))
  task.__dict__.update(lead.__dict__)  # shares the lead's config, featurised splits, tokenizer
  task.member_tasks = [r.task for r in runs]
  task.label_orders = [None if not lead.has_labels or r.labels == lead.labels
                       else [r.labels.index(name) for name in lead.labels] for r in runs]
  task.ensemble_mode = mode
  for run, order in zip(runs, task.label_orders):
    if order is not None:
      log.info("%s lists the labels in another order: mapped by name onto %s's", run.path,
               runs[0].path)
  return Ensemble(runs, mode, task)


def open_ensemble(paths: Sequence[str], mode: str = "mean", *, step: int | None = None,
                  best: bool = True) -> Ensemble:
  """The runs in `paths` (jaxft workdirs, adapter or Hugging Face directories) as one model."""
  paths = list(paths)
  repeated = sorted({p for p in paths if paths.count(p) > 1})
  if repeated:
    raise ValueError(f"--workdir repeats {repeated}: each member of an ensemble once")
  if mode not in MODES:  # before minutes of loading
    raise ValueError(f"--ensemble={mode!r}: give one of {', '.join(MODES)}")
  return make_ensemble([loader.open_run(p, step=step, best=best) for p in paths], mode)


def evaluate(ensemble: Ensemble, split: str, report_dir: str) -> dict:
  """The ensemble's report of the first member's `split` (printed and written to
  report_dir/report_{split}.json, as jaxft.evaluate writes a run's), and report_dir/
  ensemble.json naming the members and the mode."""
  for line in data_differences(ensemble.members):
    log.warning("members trained on different data (%s): scoring %s's %s split", line,
                ensemble.members[0].path, split)
  task = ensemble.task
  _, outputs = evaluation.evaluate(task, evaluation.single_device_eval(task),
                                   task.eval_batches(split), ensemble.variables, split=split)
  os.makedirs(report_dir, exist_ok=True)
  with open(os.path.join(report_dir, ENSEMBLE_FILE), "w") as f:
    json.dump({"members": [m.path for m in ensemble.members], "mode": ensemble.mode,
               "split": split}, f, indent=2)
  return evaluation.write_report(task, outputs, split, report_dir)
