"""Training entry point.

    python -m jaxft.train --config configs/gpt2.py[:variant] --workdir runs/x [--config.FIELD=V]

Rerunning the same command resumes from the newest checkpoint in the workdir: the train state,
the data iterator and the per-step random keys continue exactly where they stopped.
`jaxft.training.train_and_evaluate(config, workdir)` is the importable core (Colab, tests).
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxft.parallel import distributed
from jaxft.run import cli
from jaxft.training import NonFiniteLossError, compile_only, train_and_evaluate

__all__ = ["NonFiniteLossError", "compile_only", "train_and_evaluate"]  # for callers of jaxft.train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port "
                                   "of process 0 (see jaxft/parallel/distributed.py; Cloud TPU "
                                   "pods and SLURM are detected without it)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process runs: how many")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process runs: this one's index")
_COMPILE_ONLY = flags.DEFINE_boolean("compile_only", False, "lower and compile the train step "
                                     "for the configured mesh, print its per-device memory "
                                     "analysis and exit (no training, nothing written)")
_TOPOLOGY = flags.DEFINE_string("topology", "", "with --compile_only: compile for this TPU "
                                "slice instead of the local devices (v5e-16, v4-32, v6e-8, "
                                "v5e:4x4, ...; needs `pip install libtpu`)")

log = logging.getLogger("jaxft")


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
  with cli.user_errors("train"):  # bad config or input, refused resume, locked workdir
    try:
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:  # exit 3: diverged (rerun with a fix to resume)
      log.error("%s", e)
      raise SystemExit(3) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
