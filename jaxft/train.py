"""Training entry point.

    python -m jaxft.train --config configs/gpt2.py[:variant] --workdir runs/x [--config.FIELD=V]

Rerunning the same command resumes from the newest checkpoint in the workdir: the train state,
the data iterator and the per-step random keys continue exactly where they stopped.
`train_and_evaluate(config, workdir)` is the importable core (Colab, tests).
"""

import dataclasses
import json
import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxft import (
  aot,
  checkpoint,
  distributed,
  init_from,
  metrics,
  optim,
  peft,
  reports,
  sharding,
  steps,
  tasks,
)
from jaxft import state as state_lib
from jaxft.peft import adalora

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port of "
                                   "process 0 (see jaxft/distributed.py; Cloud TPU pods and "
                                   "SLURM are detected without it)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process runs: how many")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process runs: this one's index")
_COMPILE_ONLY = flags.DEFINE_boolean("compile_only", False, "lower and compile the train step "
                                     "for the configured mesh, print its per-device memory "
                                     "analysis and exit (no training, nothing written)")
_TOPOLOGY = flags.DEFINE_string("topology", "", "with --compile_only: compile for this TPU "
                                "slice instead of the local devices (v5e-16, v4-32, v6e-8, "
                                "v5e:4x4, ...; needs `pip install libtpu`)")

log = logging.getLogger("jaxft")


class NonFiniteLossError(RuntimeError):
  pass


def _check_vocab(config) -> None:
  from jaxft.data.tokenizer import load_tokenizer

  tok = load_tokenizer(config.data.tokenizer or None)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer ({config.data.tokenizer or 'GPT-2 BPE'}) has "
                     f"{tok.vocab_size} tokens but config.model.vocab_size="
                     f"{config.model.vocab_size}: raise config.model.vocab_size to at least "
                     f"{tok.vocab_size} or use the model's own tokenizer")


_host = distributed.to_host


def _check_finite(records: list[dict], workdir: str, last_saved: int | None) -> None:
  for r in records:
    bad = [k for k in ("train/loss", "train/grad_norm", "train/update_norm")
           if not math.isfinite(r[k])]
    if bad:
      kept = (f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints"
              if last_saved is not None else "no checkpoint had been written yet")
      raise NonFiniteLossError(
          f"{bad[0]} became {r[bad[0]]} at step {r['step']}; training stopped and nothing "
          f"after it was saved ({kept}). Lower config.optim.lr, keep config.optim.clip_norm "
          "> 0 or use float32 (config.model.dtype), then rerun to resume from that checkpoint.")


def evaluate(eval_step, params, frozen, batches, batch_sh, task, split: str = "validation"):
  """(metrics, host outputs) of one pass over `batches`."""
  outputs = [_host(eval_step(params, frozen, sharding.global_batch(b, batch_sh)))
             for b in batches]
  return task.summarize(outputs, split), outputs


def _num_steps(config, task) -> int:
  """config.num_steps, or config.num_epochs passes over the training examples."""
  epochs = config.get("num_epochs", 0)
  if config.num_steps > 0 or not epochs:
    return int(config.num_steps)
  n = task.num_train_examples()
  if n is None:
    raise ValueError(f"config.num_epochs={epochs} needs a task with a fixed training set; "
                     f"{config.task} streams text: set config.num_steps instead")
  return max(1, int(epochs * n) // config.batch_size)


def _eval_every(config, task) -> int:
  if config.eval_every > 0:
    return int(config.eval_every)
  n = task.num_train_examples()  # 0 = once per epoch
  return max(1, (n or config.batch_size) // config.batch_size)


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


def _format(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def compile_only(config: ml_collections.ConfigDict, topology: str = "") -> dict:
  """Lowers and compiles the train step for the configured mesh, on this host's devices or
  on a TPU `topology` ("v5e-16", "v4-32", "v5e:4x4"; needs libtpu), without initialising a
  parameter or running a step; prints and returns the per-device memory analysis."""
  config = init_from.resolve(config)
  devices = None
  if topology:  # one slice per config.mesh.dcn_* product: multi-slice compiles too
    slices = math.prod(sharding.dcn_shape(config.mesh))
    devices = aot.topology_devices(topology, slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                 config.axis_rules)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  with distributed.primary_first("data"):
    task = tasks.make_task(config)
    _check_vocab(config)
    batch = next(task.train_iterator(config.data.shuffle_seed, **proc))
  tx, schedule = optim.make_optimizer(config.optim, _num_steps(config, task), task.peft)
  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  shardings = state_lib.state_shardings(lay, tx, mesh)
  train_step, _, batch_sh, frozen_sh = steps.jit_steps(task, tx, schedule, config, lay,
                                                       shardings, mesh)
  report = aot.compile_report(train_step, state_lib.abstract_state(lay, tx, shardings),
                              aot.abstract_tree(lay.split(lay.abstract)[1], frozen_sh),
                              aot.abstract_batch(batch, batch_sh), local=not topology)
  if distributed.is_primary():
    print(aot.format_report(report, mesh))
    print(json.dumps(report), flush=True)  # the last line, for scripts (jaxft.bench_memory)
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) to config.num_steps (or early stopping); returns the final validation
  metrics (of the best checkpoint's params when the task reports on a test split)."""
  os.makedirs(workdir, exist_ok=True)
  config = init_from.resolve(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                 config.axis_rules)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  latest = ckpt.latest_step()
  # A resumed run keeps the label order it was trained with (labels.json).
  labels = checkpoint.load_labels(workdir) if latest is not None else None
  if latest is not None:
    _check_same_model(workdir, config)
  # Data first: a missing corpus or a bad label should fail before any compilation. One
  # process builds the dataset (a shared TFDS directory), then the others read it.
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  with distributed.primary_first("data"):
    task = tasks.make_task(config, labels=labels)
    _check_vocab(config)
    train_iter = task.train_iterator(config.data.shuffle_seed, **proc)
    eval_batches = task.eval_batches("validation", **proc)
  num_steps = _num_steps(config, task)
  eval_every = _eval_every(config, task)
  checkpoint_every = int(config.checkpoint_every) or eval_every
  tx, schedule = optim.make_optimizer(config.optim, num_steps, task.peft)
  if task.labels and distributed.is_primary():
    with open(os.path.join(workdir, checkpoint.LABELS_FILE), "w") as f:
      json.dump(task.labels, f, indent=1)

  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  shardings = state_lib.state_shardings(lay, tx, mesh)
  meta = {}
  if latest is None:
    state, frozen, _, _ = state_lib.create_train_state(
        task, tx, seq_len=config.seq_len, seed=config.seed, mesh=mesh,
        axis_rules=config.axis_rules, variables=init_from.initial_variables(task, config, lay))
  else:
    # The frozen base is not in checkpoints: rebuilt from config.init_from (or the seed).
    frozen = (lay.split(init_from.initial_variables(task, config, lay))[1] if lay.has_frozen
              else {})
    target = state_lib.abstract_state(lay, tx, shardings)
    state, meta = ckpt.restore(latest, target, train_iter)
    log.info("resumed from step %d in %s", latest, ckpt.directory)
    _check_base(meta, frozen, config)
    _truncate_metrics(workdir, latest)
  base_fingerprint = state_lib.fingerprint(frozen)
  if distributed.is_primary():
    checkpoint.save_config(workdir, config)
    metrics.write_run_info(workdir)

  es = config.get("early_stopping", ml_collections.ConfigDict())
  metric, mode = task.default_metric
  tracker = BestTracker(es.get("metric") or metric, es.get("mode") or mode,
                        int(es.get("patience", 0)), meta.get("early_stopping"))
  best_ckpt = checkpoint.BestParams(workdir)

  train_step, eval_step, batch_sh, frozen_sh = steps.jit_steps(task, tx, schedule, config,
                                                               lay, shardings, mesh)

  counts = parameter_counts(state, frozen)
  flops_tok = metrics.flops_per_token(task.model_cfg, config.seq_len)
  peak, peak_src = metrics.peak_flops_per_device()
  log.info("model: %s parameters, %s trainable (%.2f%%; %s, peak lr %g); optimizer state %s "
           "bytes; mesh %s; %.1f MFLOP/token (MFU vs %s); %d steps",
           f"{counts['params/total']:,}", f"{counts['params/trainable']:,}",
           counts["params/trainable_percent"], task.peft.describe(),
           task.peft.learning_rate(config.optim.lr), f"{counts['optimizer/state_bytes']:,}",
           dict(mesh.shape), flops_tok / 1e6, peak_src, num_steps)

  writer = metrics.Writer(workdir)
  start = int(_host(state.step))
  writer.write(start, counts)
  stopped = bool(meta.get("stopped"))
  last_saved = latest
  pending = []
  bar = metrics.progress_bar(start, num_steps)
  t_last, untimed = time.perf_counter(), 0
  val = dict(meta.get("val") or {})

  def flush(step):
    """Host-side: average the pending step metrics, check them, log them."""
    nonlocal pending, t_last, untimed
    if not pending:
      return
    host = _host(pending)
    now = time.perf_counter()
    _check_finite([{"step": step - len(host) + i + 1,
                    **{f"train/{k}": float(m[k]) for k in ("loss", "grad_norm", "update_norm")}}
                   for i, m in enumerate(host)], workdir, last_saved)
    rec = {"step": step, **{f"train/{k}": float(np.mean([m[k] for m in host]))
                            for k in ("loss", "grad_norm", "lr", "accuracy")}}
    timed = host[untimed:]
    if timed:
      rec["train/tokens_per_s"] = float(sum(m["tokens"] for m in timed)) / max(now - t_last, 1e-9)
      if math.isfinite(peak):  # an accelerator missing from metrics' table has no MFU
        rec["train/mfu"] = rec["train/tokens_per_s"] * flops_tok / (peak * jax.device_count())
    writer.write(step, rec)
    bar.set_postfix(loss=f"{rec['train/loss']:.3f}", lr=f"{rec['train/lr']:.2e}",
                    tok_s=f"{rec.get('train/tokens_per_s', 0):.0f}")
    pending, t_last, untimed = [], now, 0

  loop_start = time.perf_counter()
  try:
    for step in range(start, num_steps):
      if stopped:
        break
      batch = sharding.global_batch(next(train_iter), batch_sh)
      state, step_metrics = train_step(state, frozen, batch)
      pending.append(step_metrics)
      done = step + 1
      bar.update(1)
      if step == start:  # the first step includes compilation: keep it out of tokens/s
        jax.block_until_ready(step_metrics)
        log.info("first step (compile + run) took %.1fs", time.perf_counter() - t_last)
        t_last, untimed = time.perf_counter(), len(pending)
      is_last = done == num_steps
      if done % config.log_every == 0 or is_last:
        flush(done)
      if done % eval_every == 0 or is_last:
        flush(done)
        val, _ = evaluate(eval_step, state.params, frozen, eval_batches, batch_sh, task)
        writer.write(done, {f"val/{k}": v for k, v in val.items()})
        if tracker.update(done, val):
          best_ckpt.save(done, state.params, {"step": done, "val": val, "labels": task.labels})
        stopped = tracker.should_stop
        if distributed.is_primary():
          bar.write(f"step {done}: validation {_format(val)}"
                    + (f"; no {tracker.metric} gain in {tracker.bad_evals} evaluations: early "
                       "stop" if stopped else ""))
        t_last = time.perf_counter()  # evaluation time is not training throughput
      if done % checkpoint_every == 0 or is_last or stopped:
        flush(done)  # never save past a non-finite loss
        ckpt.save(done, state, train_iter, {"step": done, "val": val, "stopped": stopped,
                                            "early_stopping": tracker.state(),
                                            "labels": task.labels,
                                            "base_fingerprint": base_fingerprint})
        last_saved = done
        t_last = time.perf_counter()
    if num_steps > start and not meta.get("stopped"):
      # The training loop's wall time (compilation, evaluations and checkpoints included):
      # what an end-to-end throughput comparison divides by.
      writer.write(done, {"train/loop_seconds": time.perf_counter() - loop_start})
  finally:
    bar.close()
    ckpt.close()
    best_ckpt.close()
    writer.close()

  if not val:  # nothing left to train (already finished): still report
    val, _ = evaluate(eval_step, state.params, frozen, eval_batches, batch_sh, task)
  final_params = state.params
  if tracker.best_step is not None and tracker.best_step != int(_host(state.step)):
    log.info("best %s %.4f at step %d: reporting with those params", tracker.metric,
             tracker.best, tracker.best_step)
    final_params = best_ckpt.restore(state_lib.abstract_state(lay, tx, shardings).params)
    val, _ = evaluate(eval_step, final_params, frozen, eval_batches, batch_sh, task)
  report_split = task.report_split()
  if report_split:
    batches = task.eval_batches(report_split, **proc)
    _, outputs = evaluate(eval_step, final_params, frozen, batches, batch_sh, task, report_split)
    reports.write_report(task, outputs, report_split, workdir)
  ranks = adalora.rank_pattern(state.opt_state)
  if ranks and distributed.is_primary():
    log.info("AdaLoRA ranks kept per module (%d in all): %s", sum(ranks.values()), ranks)
  final_variables = _host(peft.combine(frozen, final_params))  # all processes: a collective
  if distributed.is_primary():
    png = metrics.plot_loss_curve(workdir, metrics.read_metrics(workdir))
    task.finish(workdir, final_variables, val, eval_batches)
    if png:
      print(f"loss curve: {png}")
  return val


def parameter_counts(state, frozen) -> dict:
  """Total / trainable parameters and the optimizer state's bytes (it scales with the
  trainable count: the point of PEFT)."""
  trainable, total = peft.count(state.params), peft.count(state.params) + peft.count(frozen)
  return {"params/total": total, "params/trainable": trainable,
          "params/trainable_percent": 100.0 * trainable / max(total, 1),
          "optimizer/state_bytes": peft.nbytes(state.opt_state)}


# config.model fields that change how a step computes, not the arrays a checkpoint holds.
_COMPUTE_ONLY = ("dtype", "param_dtype", "remat", "embd_pdrop", "attn_pdrop", "resid_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def _model_shape_fields(model_cfg) -> dict:
  """The model settings that decide the checkpoint's arrays (defaults filled in, so a config
  saved before a field existed compares as that field's default)."""
  from jaxft.models import registry

  fields = dataclasses.asdict(registry.model_config(model_cfg))
  return {"family": model_cfg.get("family", "gpt2"),
          **{k: v for k, v in fields.items() if k not in _COMPUTE_ONLY}}


def _check_same_model(workdir: str, config) -> None:
  """A resumed run must build the model its checkpoints hold: a changed layer count, width or
  scan_layers (stacked vs per-layer params) would otherwise fail deep inside Orbax."""
  if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
    return
  saved = _model_shape_fields(checkpoint.load_config(workdir).model)
  now = _model_shape_fields(config.model)
  changed = {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
             if saved.get(k) != now.get(k)}
  if changed:
    fields = ", ".join(f"config.model.{k}={new!r} (the checkpoints' {old!r})"
                       for k, (old, new) in sorted(changed.items()))
    raise ValueError(f"--workdir={workdir} holds checkpoints of another model: {fields}. Resume "
                     "with the model settings it was trained with, or train into a new workdir "
                     f"with --config.init_from={workdir}, which converts its weights (e.g. "
                     "between scan_layers settings)")


def _check_base(meta: dict, frozen, config) -> None:
  saved = meta.get("base_fingerprint")
  if saved is None or not frozen:
    return
  now = state_lib.fingerprint(frozen)
  if not np.isclose(now, saved, rtol=1e-6, atol=0.0):
    raise ValueError(f"config.init_from={config.init_from!r} no longer holds the base model this "
                     f"run was trained on (checksum {now:.6g}, the checkpoint's {saved:.6g}); "
                     "point config.init_from at the original base model to resume")


def _truncate_metrics(workdir: str, step: int) -> None:
  """Drop records logged after the checkpoint we resume from: they will be logged again."""
  if not distributed.is_primary():
    return
  kept = [r for r in metrics.read_metrics(workdir) if r["step"] <= step]
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def main(argv):
  del argv
  # Our progress at INFO; the libraries' (orbax, TFDS, grain) INFO chatter only with -v 0.
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  if _TOPOLOGY.value and not _COMPILE_ONLY.value:
    raise app.UsageError("--topology only applies with --compile_only (a slice this host "
                         "compiles for but cannot run on)")
  if _COMPILE_ONLY.value:
    compile_only(_CONFIG.value, _TOPOLOGY.value)
    return
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (where checkpoints and logs go)")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLossError as e:
    log.error("%s", e)
    raise SystemExit(3) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
