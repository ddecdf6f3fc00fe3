"""Trimming a trained run: score, prune, write a workdir, optionally fine-tune to recover.

    trim(workdir, out, heads=0.3, mlp=0.3, layers="0", recover_steps=200)

`out` is a jaxft workdir that every command opens (evaluate, predict, serve, export, init_from).
Without recovery it holds the pruned model itself (params in out/best). With recovery the
pruned model is written to out/pruned first, and the normal train loop fine-tunes it into out
(config.init_from = out/pruned, config.num_steps = recover_steps, the run's own optimizer
settings); out/trim.json records the plan and the figures. A LoRA run is merged first; other
PEFT methods add computation no trimmed plain model has, and are refused.
"""

import json
import logging
import os

import jax
import numpy as np

from jaxft import tasks, trees
from jaxft.run import checkpoint, evaluation, loader
from jaxft.run import workdir as workdir_lib
from jaxft.training import train_and_evaluate
from jaxft.trimming import masks as masks_lib
from jaxft.trimming import prune, scores

log = logging.getLogger("jaxft")

PRUNED_DIR = "pruned"
REPORT_FILE = "trim.json"


def check_out(out: str) -> None:
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out={out} exists and is not empty; give a new directory (trimming "
                          "never overwrites a run)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file; give a new directory")


def _unstack(params, stack: str) -> dict:
  """A scanned stack ("{stack}/..." leaves [L, ...]) as per-layer leaves "{stack}_{i}/..."."""
  out = {}
  for path, x in trees.flat_paths(params).items():
    parts = path.split("/")
    if stack not in parts:
      out[path] = np.asarray(x)
      continue
    k = parts.index(stack)
    for i in range(x.shape[0]):
      out["/".join([*parts[:k], f"{stack}_{i}", *parts[k + 1:]])] = np.asarray(x[i])
  return trees.unflat_paths(out)


def _stack(params, stack: str, n: int) -> dict:
  flat, out, groups = trees.flat_paths(params), {}, {}
  for path, x in flat.items():
    parts = path.split("/")
    k = next((j for j, p in enumerate(parts) if p.startswith(stack + "_")
              and p[len(stack) + 1:].isdigit()), None)
    if k is None:
      out[path] = x
      continue
    key = "/".join([*parts[:k], stack, *parts[k + 1:]])
    groups.setdefault(key, {})[int(parts[k][len(stack) + 1:])] = x
  for key, per_layer in groups.items():
    out[key] = np.stack([per_layer[i] for i in range(n)])
  return trees.unflat_paths(out)


def write_workdir(directory: str, config, labels, params, info: dict) -> None:
  """A params-only workdir (config.json, labels.json, the params as its best checkpoint, step
  0) that loader.open_run opens and config.init_from starts from."""
  os.makedirs(directory, exist_ok=True)
  workdir_lib.save_config(directory, config)
  if labels:
    workdir_lib.save_labels(directory, labels)
  best = checkpoint.BestParams(directory)
  # The trainable variables as the train loop saves them: {"params": the param tree}.
  best.save(0, jax.device_put({"params": params}, jax.local_devices()[0]),
            {"format": checkpoint.FORMAT, "trimmed": info})
  best.close()


def calibration_batches(task, n: int, seed: int) -> list[dict]:
  """The first `n` batches of the task's shuffled training stream (config.batch_size rows)."""
  if n < 1:
    raise ValueError(f"--calib_batches={n} must be at least 1")
  it = task.train_iterator(seed)
  try:
    return [dict(next(it)) for _ in range(n)]
  finally:
    if hasattr(it, "close"):
      it.close()


def split_metrics(path: str) -> dict:
  """The task's metrics of its held-out report split (else validation) for the run in path."""
  run = loader.open_run(path)
  split = run.task.report_split() or "validation"
  summary, _ = evaluation.evaluate(run.task, evaluation.single_device_eval(run.task),
                                   run.task.eval_batches(split), run.variables, split=split)
  return {"split": split, **{k: float(v) for k, v in summary.items()}}


def trim(workdir: str, out: str, *, heads: float = 0.0, mlp: float = 0.0, layers="0",
         recover_steps: int = 0, calib_batches: int = 16, step: int | None = None,
         seed: int = 0, evaluate: bool = True) -> dict:
  """Trims the run in `workdir` into `out`; returns (and writes to out/trim.json) the report:
  the plan, parameter counts and, with `evaluate`, the metrics before and after."""
  prune.check_fraction(heads, "--heads")
  prune.check_fraction(mlp, "--mlp")
  if recover_steps < 0:
    raise ValueError(f"--recover_steps={recover_steps} must be >= 0 (0: no recovery)")
  check_out(out)
  run = loader.open_run(workdir, step=step)
  family = masks_lib.family_of(run.config.model)
  params = jax.device_get(run.task.peft.merge(run.variables)["params"])  # LoRA folded in
  config = run.config.copy_and_resolve_references()
  scanned = bool(config.model.get("scan_layers", False))
  if scanned:
    params = _unstack(params, family.stack)
  with config.unlocked():
    config.peft.method = "none"  # the merged model is a plain one
    config.model.scan_layers = False  # the masks act on per-layer modules
    config.model.remat = "none"
  task = tasks.make_task(config, labels=run.labels)
  shape = masks_lib.shape_of(task.model_cfg, family)
  drop = prune.layers_to_drop(layers, shape["layers"])
  batches = calibration_batches(task, calib_batches, seed)
  log.info("scoring %d heads, %d MLP neurons per layer and %d layers over %d calibration "
           "batches", shape["heads"], shape["mlp"], shape["layers"], len(batches))
  importance = scores.importance(task, params, batches, family, shape)
  plan = prune.make_plan(importance, shape, heads, mlp, drop)
  trimmed = prune.apply_plan(params, plan, family)
  with config.unlocked():
    config.model.update(prune.model_overrides(config.model, plan, family, shape))
    config.model.scan_layers = scanned
    config.model.remat = run.config.model.get("remat", "none")
    config.init_from = ""  # the weights are this directory's own, not a base's
  if scanned:
    trimmed = _stack(trimmed, family.stack, plan.shape["layers"])
  info = {"from": os.path.abspath(workdir), "heads": heads, "mlp": mlp, "drop_layers": drop,
          "calib_batches": len(batches), "calib_examples": len(batches) * len(
              batches[0]["inputs"]), "score": "first-order Taylor |dL/dmask| per example",
          "kept_layers": list(plan.keep_layers), "shape_before": shape, "shape_after": plan.shape,
          "kept_heads": [list(h) for h in plan.keep_heads],
          "params_before": trees.count(params), "params_after": trees.count(trimmed)}
  pruned_dir = os.path.join(out, PRUNED_DIR) if recover_steps else out
  write_workdir(pruned_dir, config, run.labels, trimmed, info)
  log.info("pruned model (%s -> %s parameters) written to %s", f"{info['params_before']:,}",
           f"{info['params_after']:,}", pruned_dir)
  if recover_steps:
    rconfig = config.copy_and_resolve_references()
    with rconfig.unlocked():
      rconfig.init_from = os.path.abspath(pruned_dir)
      rconfig.num_steps, rconfig.num_epochs = int(recover_steps), 0
      rconfig.eval_every = int(recover_steps)  # one evaluation, at the end: the best is the last
    train_and_evaluate(rconfig, out)
  if evaluate:
    info["metrics_before"] = split_metrics(workdir)
    info["metrics_pruned"] = split_metrics(pruned_dir)
    if recover_steps:
      info["metrics_recovered"] = split_metrics(out)
  info["recover_steps"] = recover_steps
  write_report(out, info)
  return info


def write_report(out: str, info: dict) -> None:
  with open(os.path.join(out, REPORT_FILE), "w") as f:
    json.dump(info, f, indent=2)
