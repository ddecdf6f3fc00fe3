"""Training: `train_and_evaluate(config, workdir)` = setup (setup.py), the loop (loop.py), the
end-of-run reports (finish.py); best-checkpoint tracking and resume checks in best.py,
--compile_only in compile.py."""

import contextlib
import logging

import ml_collections

from jaxft import trees
from jaxft.parallel import distributed
from jaxft.run import checkpoint, flops, lock, logs
from jaxft.tasks import Task
from jaxft.training.best import BestTracker
from jaxft.training.compile import compile_only
from jaxft.training.finish import finish
from jaxft.training.loop import NonFiniteLossError, train_loop
from jaxft.training.setup import parameter_counts, setup

__all__ = ["NonFiniteLossError", "compile_only", "train_and_evaluate"]

log = logging.getLogger("jaxft")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_evaluation=None) -> dict[str, float]:
  """Trains (or resumes) to config.num_steps (or early stopping); returns the final validation
  metrics (of the best checkpoint's params when the task reports on a test split). Process 0
  holds the workdir's lock for the whole run: a second run on it is refused.

  on_evaluation(step, val_metrics) -> bool, called after every evaluation (on every process:
  it must answer alike on each): True stops the run there, checkpointed and marked stopped like
  an early stop (jaxft/sweeping/ prunes trials with it)."""
  with lock.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext():
    s = setup(config, workdir)
    tracker = BestTracker.from_config(s.config, s.task, s.meta.get("early_stopping"))
    best_ckpt = checkpoint.BestParams(workdir)
    counts = parameter_counts(s.state, s.frozen)
    _log_model(s, counts)
    if type(s.task).before_training is not Task.before_training and not int(
        distributed.to_host(s.state.step)):  # a new run: the starting model's figures
      start = distributed.to_host(trees.combine(s.frozen, s.state.params))  # a collective
      if distributed.is_primary():
        s.task.before_training(workdir, start)
    writer = logs.Writer(workdir)
    try:
      writer.write(int(distributed.to_host(s.state.step)), counts)
      result = train_loop(s, writer, tracker, best_ckpt, on_evaluation)
      s.ckpt.wait()  # a failed last save stops the run here, with its message
    except BaseException:
      # Cleanup after a failure logs its own errors instead of raising them: the first error
      # (a failed save, a NaN, a kill) is the one the user sees.
      _close(s, best_ckpt, writer, quiet=True)
      raise
    _close(s, best_ckpt, writer, quiet=False)
    return finish(s, result.state, result.val, tracker, best_ckpt)


def _close(s, best_ckpt, writer, *, quiet: bool) -> None:
  try:
    s.ckpt.close(quiet=quiet)
  finally:
    try:
      best_ckpt.close(quiet=quiet)
    finally:
      try:
        writer.close()
      finally:
        s.train_iter.close()  # the input thread stops preparing batches


def _log_model(s, counts: dict) -> None:
  peft, lr = s.task.peft, s.config.optim.lr
  log.info("model: %s parameters, %s trainable (%.2f%%; %s, peak lr %g); optimizer state %s "
           "bytes; mesh %s; %.1f MFLOP/token (MFU vs %s); %d steps",
           f"{counts['params/total']:,}", f"{counts['params/trainable']:,}",
           counts["params/trainable_percent"], peft.describe(), peft.learning_rate(lr),
           f"{counts['optimizer/state_bytes']:,}", dict(s.mesh.shape),
           s.task.flops_per_token(s.config.seq_len) / 1e6,
           flops.peak_flops_per_device()[1], s.num_steps)
