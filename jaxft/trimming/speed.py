"""Inference speed of runs side by side: jaxft.predict's path (tokenise, batch, the jitted
eval step) on the same records and batch size, timed after a warm-up pass that compiles it.

Runs are timed in turns (a, b, a, b, ...), so load from other jobs on a shared machine falls
on each about equally; the figure per run is its fastest repeat."""

import time

from jaxft.inference import prediction
from jaxft.run import evaluation, loader


def split_records(path: str, split: str = "test") -> list[dict]:
  """The raw input records ({"text": ...}) of a labelled run's split."""
  run = loader.open_run(path)
  if not hasattr(type(run.task), "splits"):
    raise ValueError(f"{path}: a {run.task.name} run has no labelled splits to time on")
  fields = run.task.prediction_fields
  source = run.task.splits[split]  # a cached property of labelled tasks
  return [{k: source[i][k] for k in fields} for i in range(len(source))]


def _predict(run, eval_fn, records):
  """prediction.predict with one jitted eval step held across calls (no recompilation)."""
  task = run.task
  examples = task.prediction_inputs(records)
  features = task.prediction_features(examples)
  outputs = evaluation.run_batches(eval_fn, task.prediction_batches(features), run.variables)
  return task.predictions(examples, features, outputs)


def compare(paths: list[str], records: list[dict], batch_size: int = 64,
            repeats: int = 5) -> dict[str, dict]:
  """{path: {"seconds": fastest pass over `records`, "examples_per_s": ...}}."""
  runs = {}
  for path in paths:
    run = loader.open_run(path)
    prediction.check_predicts(run)
    with run.task.config.unlocked():
      run.task.config.eval_batch_size = batch_size
    eval_fn = evaluation.single_device_eval(run.task)
    _predict(run, eval_fn, records[:batch_size])  # compiles
    runs[path] = (run, eval_fn)
  best = {p: float("inf") for p in paths}
  for _ in range(repeats):
    for path, (run, eval_fn) in runs.items():
      start = time.perf_counter()
      _predict(run, eval_fn, records)
      best[path] = min(best[path], time.perf_counter() - start)
  return {p: {"seconds": best[p], "examples_per_s": len(records) / best[p],
              "examples": len(records), "batch_size": batch_size} for p in paths}
