"""Scores a trained run on one of its splits and writes the task's report.

    python -m jaxft.evaluate --workdir runs/bbc --split test [--step N | --latest]

Uses the best checkpoint (kept by early stopping in workdir/best) unless --step or --latest
says otherwise. Prints the task's table (per-class report / entity table / EM-F1) and saves it
as workdir/report_{split}.json.
"""

from absl import app, flags

from jaxft.run import cli, evaluation, loader
from jaxft.run import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "jaxft training directory")
_SPLIT = flags.DEFINE_string("split", "test", "split to score: train, validation or test")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the best, else latest)")
_LATEST = flags.DEFINE_boolean("latest", False, "score the latest checkpoint, not the best")


def evaluate_run(workdir: str, split: str = "test", step: int | None = None,
             latest: bool = False) -> dict:
  """The task's report of `split` (also written to workdir/report_{split}.json)."""
  if not workdir_lib.is_workdir(workdir):
    workdir_lib.load_config(workdir)  # no config.json: raises naming the fix
    raise ValueError(f"--workdir={workdir} is a Hugging Face directory: jaxft.evaluate scores the "
                     "splits of a jaxft run; fine-tune it first (python -m jaxft.train "
                     f"--config.init_from={workdir}) or label inputs with python -m jaxft.predict")
  run = loader.open_run(workdir, step=step, best=not latest)
  _, outputs = evaluation.evaluate(run.task, evaluation.single_device_eval(run.task),
                                   run.task.eval_batches(split), run.variables, split=split)
  return evaluation.write_report(run.task, outputs, split, workdir)


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("give --workdir (a jaxft training directory)")
  with cli.user_errors("evaluate"):
    evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _LATEST.value)


if __name__ == "__main__":
  app.run(main)
