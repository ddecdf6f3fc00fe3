"""Scores a trained run (or an ensemble of runs) on one of its splits and writes the task's report.

    python -m jaxft.evaluate --workdir runs/bbc --split test [--step N | --latest]
    python -m jaxft.evaluate --workdir runs/bbc --split test --robustness [--attack_epsilon 0.5]
    python -m jaxft.evaluate --workdir runs/bbc,runs/bbc_seed1,runs/bbc_seed2 \\
        --ensemble mean --report_dir runs/bbc_ensemble --split test

Uses the best checkpoint (kept by early stopping in workdir/best) unless --step or --latest
says otherwise. Prints the task's table (per-class report / entity table / EM-F1) and saves it
as workdir/report_{split}.json (--report_dir/report_{split}.json when given). Several --workdir
(repeated or comma-separated) are scored as one ensemble (docs/ensembles.md) on the first
one's split; --report_dir is then required, so no member's own report is overwritten.
"""

import dataclasses
import json
import os

from absl import app, flags

from jaxft.inference import ensemble, robustness
from jaxft.run import cli, evaluation, loader
from jaxft.run import workdir as workdir_lib


def _define_flags() -> None:
  flags.DEFINE_multi_string("workdir", None, "jaxft training directory; several (repeated or "
                            "comma-separated): their ensemble")
  flags.DEFINE_string("split", "test", "split to score: train, validation or test")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the best, else latest)")
  flags.DEFINE_boolean("latest", False, "score the latest checkpoint, not the best")
  flags.DEFINE_enum("ensemble", "mean", list(ensemble.MODES), "several --workdir: average "
                    "the members' probabilities, or majority vote")
  flags.DEFINE_string("report_dir", None, "where report_{split}.json goes (default: the "
                      "workdir; required for an ensemble)")
  flags.DEFINE_boolean("robustness", False, "also score the split under an embedding-space PGD "
                       "attack and with typos / synonym swaps in its texts (one run)")
  flags.DEFINE_float("attack_epsilon", 1.0, "--robustness: the attack's L2 radius per example")
  flags.DEFINE_integer("attack_steps", 10, "--robustness: PGD ascent steps")
  flags.DEFINE_float("typo_rate", 0.1, "--robustness: fraction of words given a typo")
  flags.DEFINE_float("synonym_rate", 0.2, "--robustness: fraction of words swapped for a "
                     "WordNet synonym")


def _check_workdir(workdir: str) -> None:
  if not workdir_lib.is_workdir(workdir):
    workdir_lib.load_config(workdir)  # no config.json: raises naming the fix
    raise ValueError(f"--workdir={workdir} is a Hugging Face directory: jaxft.evaluate scores the "
                     "splits of a jaxft run; fine-tune it first (python -m jaxft.train "
                     f"--config.init_from={workdir}) or label inputs with python -m jaxft.predict")


def evaluate_run(workdir: str, split: str = "test", step: int | None = None,
                 latest: bool = False, report_dir: str | None = None) -> dict:
  """The task's report of `split` (also written to report_dir, default the workdir, as
  report_{split}.json)."""
  _check_workdir(workdir)
  run = loader.open_run(workdir, step=step, best=not latest)
  _, outputs = evaluation.evaluate(run.task, evaluation.single_device_eval(run.task),
                                   run.task.eval_batches(split), run.variables, split=split)
  if report_dir:
    os.makedirs(report_dir, exist_ok=True)
  return evaluation.write_report(run.task, outputs, split, report_dir or workdir)


def robustness_report(workdir: str, split: str, checks: robustness.Checks,
                      step: int | None = None, latest: bool = False,
                      report_dir: str | None = None) -> dict:
  """Prints the metric clean / under attack / with perturbed texts and writes
  robustness_{split}.json (jaxft/inference/robustness.py)."""
  _check_workdir(workdir)
  run = loader.open_run(workdir, step=step, best=not latest)
  results = robustness.check(run.task, run.variables, split, checks)
  metric = run.task.default_metric[0]
  print(robustness.format_table(results, checks, metric))
  out = {"split": split, "checks": dataclasses.asdict(checks), "results": results}
  os.makedirs(report_dir or workdir, exist_ok=True)
  with open(os.path.join(report_dir or workdir, f"robustness_{split}.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def evaluate_ensemble(workdirs: list[str], report_dir: str | None, split: str = "test",
                      mode: str = "mean", step: int | None = None, latest: bool = False) -> dict:
  """The ensemble's report of the first workdir's `split`, written to report_dir."""
  if not report_dir:
    raise ValueError("several --workdir score an ensemble: give --report_dir (where its "
                     "report_{split}.json and ensemble.json go; no member's report is touched)")
  for workdir in workdirs:
    _check_workdir(workdir)
  members = ensemble.open_ensemble(workdirs, mode, step=step, best=not latest)
  return ensemble.evaluate(members, split, report_dir)


def main(argv):
  del argv
  f = flags.FLAGS
  workdirs = ensemble.split_paths(f.workdir or [])
  if not workdirs:
    raise app.UsageError("give --workdir (a jaxft training directory; several: an ensemble)")
  with cli.user_errors("evaluate"):
    if f.robustness and len(workdirs) > 1:
      raise app.UsageError("--robustness scores one run: give one --workdir")
    if f.robustness:
      checks = robustness.Checks(epsilon=f.attack_epsilon, steps=f.attack_steps,
                                 typo_rate=f.typo_rate, synonym_rate=f.synonym_rate)
      robustness_report(workdirs[0], f.split, checks, f.step, f.latest, f.report_dir)
    elif len(workdirs) == 1:
      evaluate_run(workdirs[0], f.split, f.step, f.latest, f.report_dir)
    else:
      evaluate_ensemble(workdirs, f.report_dir, f.split, f.ensemble, f.step, f.latest)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
