"""Continual learning over class-incremental stages, with the forgetting report.

    python -m jaxft.continual --config configs/finetune.py:bbc_news --workdir runs/cl \
        --stage business,entertainment,politics --stage sports,tech \
        --strategy naive --strategy ewc --strategy replay --strategy lora \
        [--ewc_weight 1e7] [--replay_ratio 0.2 --replay_size 200] [--config.FIELD=VALUE ...]

Each strategy trains the stages in order (one train_and_evaluate each, the head always has
every label): stage 0 of naive / ewc / replay once into <workdir>/stage_0 (they share it), the
later stages and every LoRA stage into <workdir>/<strategy>/stage_k; after each stage it
scores the test examples of every stage so far. <workdir>/<strategy>/report.md holds the
accuracy matrix, average accuracy, backward transfer and forgetting; <workdir>/report.md
compares the strategies (forgetting as a fraction of naive fine-tuning's). Rerunning
continues: finished stages are skipped, an interrupted one resumes. docs/continual-learning.md.
"""

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxft.lifelong import STRATEGIES, Options, run_continual
from jaxft.lifelong.report import REPORT_MD
from jaxft.run import cli


def _define_flags() -> None:
  """Only when run as a program: other modules define --config too."""
  config_flags.DEFINE_config_file("config", None, "Python config file[:variant] of every "
                                  "stage (classification); --config.FIELD=VALUE overrides "
                                  "apply to each", lock_config=True)
  flags.DEFINE_string("workdir", None, "directory of the strategies' stages and the reports")
  flags.DEFINE_multi_string("stage", [], "one stage's labels, comma-separated; repeat in "
                            "order (e.g. --stage business,politics --stage sports,tech)")
  flags.DEFINE_multi_enum("strategy", ["naive"], list(STRATEGIES), "strategies to run (each "
                          "in <workdir>/<strategy>); repeatable")
  defaults = Options()
  flags.DEFINE_float("ewc_weight", defaults.ewc_weight, "ewc: lambda of the penalty "
                     "lambda / 2 * sum F (theta - anchor)^2")
  flags.DEFINE_integer("fisher_examples", defaults.fisher_examples, "ewc: training examples "
                       "of a stage its diagonal Fisher is estimated on")
  flags.DEFINE_float("replay_ratio", defaults.replay_ratio, "replay: fraction of each later "
                     "epoch drawn from the buffer, in (0, 1)")
  flags.DEFINE_integer("replay_size", defaults.replay_size, "replay: reservoir capacity "
                       "(examples of all earlier stages)")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxft").setLevel(logging.INFO)
  if f.workdir is None:
    raise app.UsageError("--workdir is required (where the stages and reports go)")
  if not f.stage:
    raise app.UsageError("give the stages in order: --stage LABEL,LABEL --stage LABEL ...")
  with cli.user_errors("continual"):  # a bad stage, strategy option or config: one line
    run_continual(f.config, f.workdir, f.stage, f.strategy, ewc_weight=f.ewc_weight,
                  fisher_examples=f.fisher_examples, replay_ratio=f.replay_ratio,
                  replay_size=f.replay_size)
  for path in [os.path.join(f.workdir, s, REPORT_MD) for s in f.strategy] + [
      os.path.join(f.workdir, REPORT_MD)]:
    print(open(path).read())


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
