"""The end of a run: report with the best params (restored from workdir/best when they are not
the last step's), score the task's held-out split, let the PEFT method and the task say what
they learned, and draw the loss curve."""

import logging

from jaxft import trees
from jaxft.parallel import distributed
from jaxft.run import checkpoint, evaluation, logs
from jaxft.run import state as state_lib
from jaxft.run import workdir as workdir_lib
from jaxft.training.best import BestTracker
from jaxft.training.setup import Setup

log = logging.getLogger("jaxft")


def finish(s: Setup, state, val: dict, tracker: BestTracker,
           best_ckpt: checkpoint.BestParams) -> dict:
  """The final validation metrics (of the best params when early stopping kept them)."""
  task, proc = s.task, s.process

  def score(params, batches, split="validation"):
    return evaluation.evaluate(task, s.eval_step, batches, params, s.frozen, split=split,
                               batch_sharding=s.batch_sharding)

  if not val:  # nothing left to train (already finished): still report
    val, _ = score(state.params, s.eval_batches)
  final_params = state.params
  if tracker.best_step is not None and tracker.best_step != int(distributed.to_host(state.step)):
    log.info("best %s %.4f at step %d: reporting with those params", tracker.metric,
             tracker.best, tracker.best_step)
    final_params = best_ckpt.restore(state_lib.abstract_state(s.layout, s.tx,
                                                              s.shardings).params)
    val, _ = score(final_params, s.eval_batches)
  report_split = task.report_split()
  if report_split:
    _, outputs = score(final_params, task.eval_batches(report_split, **proc), report_split)
    evaluation.write_report(task, outputs, report_split, s.workdir)
  line = task.peft.final_report(state.opt_state)
  if line and distributed.is_primary():
    log.info("%s", line)
  final_variables = distributed.to_host(trees.combine(s.frozen, final_params))  # a collective
  if distributed.is_primary():
    png = logs.plot_loss_curve(s.workdir, workdir_lib.read_metrics(s.workdir))
    task.finish(s.workdir, final_variables, val, s.eval_batches)
    if png:
      print(f"loss curve: {png}")
  return val
