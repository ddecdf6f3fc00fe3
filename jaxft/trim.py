"""Trims a trained run: prunes attention heads, MLP neurons and layers by importance over a
calibration set, then (optionally) fine-tunes to recover.

    python -m jaxft.trim --workdir runs/bbc --heads 0.3 --mlp 0.3 [--layers 1 | 0.25] \\
        --recover_steps 200 --out runs/bbc-trim [--speed]

--out becomes a jaxft workdir (evaluate, predict, serve, export and --config.init_from open
it): a model of the same family with fewer heads per layer, a narrower MLP and fewer layers.
--speed times prediction on the test split, original against trimmed, in one process.
Details and figures: docs/trimming.md.
"""

import json
import logging

from absl import app, flags
from absl import logging as absl_logging

from jaxft.run import cli
from jaxft.trimming import speed, workflow

log = logging.getLogger("jaxft")


def _define_flags() -> None:
  """Only when run as a program (tests call jaxft.trimming instead)."""
  flags.DEFINE_string("workdir", None, "the trained jaxft run to trim")
  flags.DEFINE_string("out", None, "a new directory for the trimmed run (never overwritten)")
  flags.DEFINE_float("heads", 0.0, "fraction of each layer's attention heads to remove, [0, 1)")
  flags.DEFINE_float("mlp", 0.0, "fraction of each layer's MLP neurons to remove, [0, 1)")
  flags.DEFINE_string("layers", "0", "layers to drop: a count (2) or a fraction (0.25)")
  flags.DEFINE_integer("recover_steps", 0, "fine-tuning steps after pruning (0: none)")
  flags.DEFINE_integer("calib_batches", 16, "training batches (config.batch_size rows) the "
                       "importance scores are summed over")
  flags.DEFINE_integer("step", None, "checkpoint of --workdir (default: the best, else latest)")
  flags.DEFINE_boolean("evaluate", True, "score the original, pruned and recovered models on "
                       "the held-out split")
  flags.DEFINE_boolean("speed", False, "time prediction on the test split: original vs trimmed")
  flags.DEFINE_integer("speed_batch_size", 64, "with --speed: rows per prediction batch")
  flags.DEFINE_boolean("speed_only", False, "only time prediction of the existing runs "
                       "--workdir and --out (e.g. after a trim without --speed)")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  if not f.workdir or not f.out:
    raise app.UsageError("give --workdir (a trained jaxft run) and --out (a new directory)")
  with cli.user_errors("trim"):
    if f.speed_only:
      timings = speed.compare([f.workdir, f.out], speed.split_records(f.workdir),
                              f.speed_batch_size)
      print(json.dumps(timings, indent=1))
      return
    info = workflow.trim(f.workdir, f.out, heads=f.heads, mlp=f.mlp, layers=f.layers,
                         recover_steps=f.recover_steps, calib_batches=f.calib_batches,
                         step=f.step, evaluate=f.evaluate)
    if f.speed:
      timings = speed.compare([f.workdir, f.out], speed.split_records(f.workdir),
                              f.speed_batch_size)
      info["speed"] = timings
      workflow.write_report(f.out, info)
  print(json.dumps({k: v for k, v in info.items() if k != "kept_heads"}, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
