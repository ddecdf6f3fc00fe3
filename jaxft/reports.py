"""Evaluation passes outside the train loop, and the report files every evaluation writes."""

import json
import os

import jax


def run_eval(task, variables, batches):
  """Host outputs of task.eval_outputs over `batches` (one device)."""
  step = jax.jit(task.eval_outputs)
  return [jax.tree.map(jax.device_get, step(variables, b)) for b in batches]


def write_report(task, outputs, split: str, workdir: str) -> dict:
  """Prints the task's detailed report of `split` and saves it as report_{split}.json."""
  text, data = task.report(outputs, split)
  if jax.process_index() == 0:
    print(f"=== {split} ===\n{text}")
    path = os.path.join(workdir, f"report_{split}.json")
    with open(path, "w") as f:
      json.dump(data, f, indent=2)
    print(f"report: {path}")
  return data
