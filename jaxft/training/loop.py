"""The training loop: step, log, evaluate (keeping the best params), checkpoint, stop early.

Step metrics stay on device until a log point (no host sync per step); `StepLog` then averages
them, checks them for NaN/inf before anything after them can be saved, and writes them."""

import dataclasses
import logging
import math
import time

import jax
import numpy as np

from jaxft.parallel import distributed
from jaxft.run import adversarial, checkpoint, evaluation, flops, logs
from jaxft.training import best as best_lib
from jaxft.training.setup import Setup

log = logging.getLogger("jaxft")


class NonFiniteLossError(RuntimeError):
  pass


def check_finite(records: list[dict], workdir: str, last_saved: int | None) -> None:
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


# Step metrics that are not logged as per-step means (tokens is a throughput; the norms a
# check) or are already in the standard four.
_NOT_LOGGED_AS_MEANS = ("loss", "grad_norm", "lr", "accuracy", "tokens", "update_norm")


def format_metrics(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class StepLog:
  """The step metrics since the last log point, and the clock that turns them into tokens/s
  (compilation, evaluation and checkpoint time kept out)."""

  def __init__(self, s: Setup, writer: logs.Writer, bar, last_saved: int | None):
    self.workdir, self.writer, self.bar, self.last_saved = s.workdir, writer, bar, last_saved
    self.train_iter = s.train_iter
    # Adversarial training runs several forward/backward passes a step (MaxText's convention
    # counts the model FLOPs the device really runs).
    self.flops_per_token = (s.task.flops_per_token(s.config.seq_len)
                            * adversarial.passes(s.config))
    self.peak, _ = flops.peak_flops_per_device()
    self.pending: list = []
    self.untimed = 0  # pending steps that include compilation
    self.restart_clock()

  def restart_clock(self, now: float | None = None) -> None:
    self.t_last = time.perf_counter() if now is None else now
    self.waited_before = self.train_iter.wait_s

  def first_step_done(self) -> None:
    """The first step includes compilation: keep it out of tokens/s."""
    jax.block_until_ready(self.pending[-1])
    log.info("first step (compile + run) took %.1fs", time.perf_counter() - self.t_last)
    self.restart_clock()
    self.untimed = len(self.pending)

  def flush(self, step: int) -> None:
    """Host-side: average the pending step metrics, check them, log them."""
    if not self.pending:
      return
    host = distributed.to_host(self.pending)
    now = time.perf_counter()
    check_finite([{"step": step - len(host) + i + 1,
                   **{f"train/{k}": float(m[k]) for k in ("loss", "grad_norm", "update_norm")}}
                  for i, m in enumerate(host)], self.workdir, self.last_saved)
    # The standard four, and whatever else the task's loss reports (DPO's margins, log-probs).
    keys = ("loss", "grad_norm", "lr", "accuracy",
            *[k for k in host[0] if k not in _NOT_LOGGED_AS_MEANS])
    rec = {"step": step, **{f"train/{k}": float(np.mean([m[k] for m in host])) for k in keys}}
    timed = host[self.untimed:]
    if timed:
      tokens_per_s = float(sum(m["tokens"] for m in timed)) / max(now - self.t_last, 1e-9)
      # MFU only where the device's peak is known (an accelerator missing from flops' table).
      rec.update({f"train/{k}": v for k, v in flops.throughput(
          tokens_per_s, self.flops_per_token, self.peak, jax.device_count()).items()})
      # Time the loop waited for a batch that was not prepared yet: input-bound time (an upper
      # bound of the device's idle time, which may still have been finishing the step before).
      rec["train/input_wait_fraction"] = ((self.train_iter.wait_s - self.waited_before)
                                          / max(now - self.t_last, 1e-9))
    self.writer.write(step, rec)
    self.bar.set_postfix(loss=f"{rec['train/loss']:.3f}", lr=f"{rec['train/lr']:.2e}",
                         tok_s=f"{rec.get('train/tokens_per_s', 0):.0f}")
    self.pending, self.untimed = [], 0
    self.restart_clock(now)


@dataclasses.dataclass
class LoopResult:
  state: object
  val: dict  # the latest validation metrics ({} if nothing was left to train)


def train_loop(s: Setup, writer: logs.Writer, tracker: best_lib.BestTracker,
               best_ckpt: checkpoint.BestParams, on_evaluation=None) -> LoopResult:
  """Steps from the restored step to s.num_steps (or an early stop), evaluating every
  s.eval_every steps and checkpointing every s.checkpoint_every. on_evaluation(step, val) is
  called after each evaluation; True stops the run as early stopping does (a hyperparameter
  search's pruner): the checkpoint is written marked stopped, so a rerun does not continue."""
  state, task = s.state, s.task
  start = int(distributed.to_host(state.step))
  stopped = bool(s.meta.get("stopped"))
  val = dict(s.meta.get("val") or {})
  bar = logs.progress_bar(start, s.num_steps)
  step_log = StepLog(s, writer, bar, s.ckpt.latest_step())
  loop_start = time.perf_counter()
  done = start
  try:
    for step in range(start, s.num_steps):
      if stopped:
        break
      batch = next(s.train_iter)  # prepared during the previous step (run/prefetch.py)
      state, step_metrics = s.train_step(state, s.step_frozen, batch)
      step_log.pending.append(step_metrics)
      done = step + 1
      bar.update(1)
      if step == start:
        step_log.first_step_done()
      is_last = done == s.num_steps
      if done % s.config.log_every == 0 or is_last:
        step_log.flush(done)
      if done % s.eval_every == 0 or is_last:
        step_log.flush(done)
        val, _ = evaluation.evaluate(task, s.eval_step, s.eval_batches, state.params, s.frozen,
                                     batch_sharding=s.batch_sharding)
        writer.write(done, {f"val/{k}": v for k, v in val.items()})
        if tracker.update(done, val):
          best_ckpt.save(done, state.params, {"step": done, "val": val, "labels": task.labels})
        stopped = tracker.should_stop
        asked = on_evaluation is not None and bool(on_evaluation(done, val)) and not stopped
        if distributed.is_primary():
          bar.write(f"step {done}: validation {format_metrics(val)}"
                    + (f"; no {tracker.metric} gain in {tracker.bad_evals} evaluations: early "
                       "stop" if stopped else "")
                    + ("; stopped by the on_evaluation callback" if asked else ""))
        stopped = stopped or asked
        step_log.restart_clock()  # evaluation time is not training throughput
      if done % s.checkpoint_every == 0 or is_last or stopped:
        step_log.flush(done)  # never save past a non-finite loss
        s.ckpt.save(done, state, s.train_iter, {
            "step": done, "val": val, "stopped": stopped, "early_stopping": tracker.state(),
            "labels": task.labels, "base_fingerprint": s.base_fingerprint})
        step_log.last_saved = done
        step_log.restart_clock()
    if s.num_steps > start and not s.meta.get("stopped"):
      # The training loop's wall time (compilation, evaluations and checkpoints included):
      # what an end-to-end throughput comparison divides by.
      writer.write(done, {"train/loop_seconds": time.perf_counter() - loop_start})
  finally:
    bar.close()
  return LoopResult(state, val)
