"""The one evaluation loop (training's validation passes, jaxft.evaluate, jaxft.predict and prompt
scoring all run batches through `run_batches`) and the report files an evaluation writes."""

import collections
import json
import os

import jax

from jaxft.parallel import distributed, sharding

# Batches dispatched before the host waits for the oldest result: the device computes the next
# batch while the host copies the previous one out (and a long split never piles up on device).
_IN_FLIGHT = 2


def run_batches(fn, batches, *args, batch_sharding=None) -> list:
  """Host (numpy) outputs of `fn(*args, batch)` for each batch, in order.

  With `batch_sharding` (the train mesh's batch sharding) each batch holds this process's rows
  and is assembled into a global array first; without it, batches go to the default device.
  Every process of a multi-process run must call this together (outputs are gathered)."""
  outputs, pending = [], collections.deque()
  for batch in batches:
    if batch_sharding is not None:
      batch = sharding.global_batch(batch, batch_sharding)
    pending.append(fn(*args, batch))
    if len(pending) > _IN_FLIGHT:
      outputs.append(distributed.to_host(pending.popleft()))
  outputs.extend(distributed.to_host(out) for out in pending)
  return outputs


def evaluate(task, eval_fn, batches, *args, split: str = "validation", batch_sharding=None):
  """(task metrics, host outputs) of one pass of `eval_fn(*args, batch)` (the task's
  eval_outputs, jitted) over `batches`."""
  outputs = run_batches(eval_fn, batches, *args, batch_sharding=batch_sharding)
  return task.summarize(outputs, split), outputs


def single_device_eval(task):
  """The task's eval_outputs jitted for variables and batches on one device (the inference
  commands; training jits its own step with the mesh's shardings, jaxft/run/steps.py)."""
  return jax.jit(task.eval_outputs)


def write_report(task, outputs, split: str, workdir: str) -> dict:
  """Prints the task's detailed report of `split` and saves it as report_{split}.json."""
  text, data = task.report(outputs, split)
  if distributed.is_primary():
    print(f"=== {split} ===\n{text}")
    path = os.path.join(workdir, f"report_{split}.json")
    with open(path, "w") as f:
      json.dump(data, f, indent=2)
    print(f"report: {path}")
  return data
