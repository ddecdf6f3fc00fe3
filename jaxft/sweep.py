"""Hyperparameter search: one training run per trial, an Optuna study shared through SQLite.

    python -m jaxft.sweep --config configs/finetune.py:bbc_news --sweep_dir sweeps/bbc \
        --param optim.lr=loguniform:1e-5:1e-3 --param peft.rank=choice:4,8,16 --trials 20 \
        [--config.FIELD=VALUE ...]
    python -m jaxft.sweep --config ... --sweep_dir sweeps/grid --grid \
        --param optim.lr=choice:1e-4,3e-4 --param peft.rank=choice:4,8

TPE sampling (seeded by --seed) with median pruning on the validation metric each evaluation
reports; --grid runs every combination of choice params instead. Each trial trains in
<sweep_dir>/trial_<n>; the study is <sweep_dir>/study.db. Rerunning the same command continues
the study (--trials counts all its trials); an interrupted trial resumes from its checkpoint.
trials.csv, trials.md and metric_vs_params.png are written to --sweep_dir. docs/sweep.md.
"""

import logging
import os
import signal

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxft.run import cli
from jaxft.sweeping import run_sweep
from jaxft.sweeping.report import MARKDOWN_FILE


def _define_flags() -> None:
  """Only when run as a program: other modules define --config too."""
  config_flags.DEFINE_config_file("config", None, "Python config file[:variant] of the base "
                                  "run; --config.FIELD=VALUE overrides apply to every trial",
                                  lock_config=True)
  flags.DEFINE_string("sweep_dir", None, "directory of the study (study.db), the trials' "
                      "workdirs and the report")
  flags.DEFINE_multi_string("param", [], "NAME=KIND:ARGS, repeatable: loguniform:LOW:HIGH, "
                            "uniform:LOW:HIGH, int:LOW:HIGH[:STEP|:log], choice:A,B,C")
  flags.DEFINE_integer("trials", 0, "trials the study should have in all (rerunning adds the "
                       "missing ones); with --grid, 0 = the whole grid")
  flags.DEFINE_boolean("grid", False, "run every combination of the choice params (no "
                       "continuous params) instead of TPE sampling")
  flags.DEFINE_integer("seed", 0, "sampler seed (give each machine sharing a study its own)")
  flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache shared by the "
                      "trials; default <sweep_dir>/jax_cache; 'none' = off")


def _interrupted(signum, frame):
  """SIGTERM (a scheduler's preemption) ends the sweep as Ctrl-C does: the running trial is
  marked failed and queued to resume from its checkpoint on the next run."""
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  del argv
  signal.signal(signal.SIGTERM, _interrupted)
  f = flags.FLAGS
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxft").setLevel(logging.INFO)
  if f.sweep_dir is None:
    raise app.UsageError("--sweep_dir is required (where the study and the trials go)")
  if not f.param:
    raise app.UsageError("give at least one --param NAME=KIND:ARGS, e.g. "
                         "--param optim.lr=loguniform:1e-5:1e-3")
  with cli.user_errors("sweep"):  # a bad --param, config field or study: one line
    cache = f.compilation_cache or os.path.join(f.sweep_dir, "jax_cache")
    run_sweep(f.config, f.param, f.sweep_dir, f.trials, grid=f.grid, seed=f.seed,
              compilation_cache_dir=None if cache == "none" else cache)
  table = os.path.join(f.sweep_dir, MARKDOWN_FILE)
  if os.path.exists(table):
    print(open(table).read())


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
