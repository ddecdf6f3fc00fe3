"""Quantises a trained run's weights (weight-only; docs/quantization.md) into a new directory
that evaluate, predict, generate and serve open like the run itself.

    python -m jaxft.quantize --workdir runs/bbc --bits 8 --out runs/bbc-int8
    python -m jaxft.quantize --workdir runs/gpt2 --bits 4 --group_size 64 --out runs/gpt2-int4
    python -m jaxft.evaluate --workdir runs/bbc-int8

--bits 8: int8, one scale per output channel (per row of an embedding table). --bits 4: int4 in
[-7, 7], one scale per --group_size inputs of each output channel. A PEFT (LoRA) run is merged
into its base first. --workdir may also be a Hugging Face model directory. --out must be new or
empty: nothing already saved is overwritten.
"""

import os

from absl import app, flags

from jaxft import quant
from jaxft.run import cli, loader
from jaxft.run import workdir as workdir_lib


def _define_flags() -> None:
  """Only when run as a program: other modules define --workdir too."""
  flags.DEFINE_string("workdir", None, "jaxft run (or Hugging Face directory) to quantise")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the best, else the latest)")
  flags.DEFINE_integer("bits", 8, "8 (int8 per output channel) or 4 (int4, grouped)")
  flags.DEFINE_integer("group_size", 128, "--bits 4: inputs per scale (where it does not divide "
                       "a weight's input size, that weight uses the largest divisor below it)")
  flags.DEFINE_string("out", None, "new (or empty) directory for the quantised run")


def quantize_dir(workdir: str, out: str, bits: int = 8, group_size: int = 128,
                 step: int | None = None) -> dict:
  """Writes the quantised run of `workdir` to `out`; returns {"fp32_bytes", "quantized_bytes"}
  (the weights as they sit in memory)."""
  quant.check_bits(bits)
  if bits == 4 and group_size < 1:
    raise ValueError(f"--group_size={group_size} must be a positive number of inputs")
  if not out:
    raise ValueError("give --out, a new directory for the quantised run")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out={out} exists and is not an empty directory; give a new "
                          "directory (nothing already saved is overwritten)")
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError("--out must differ from --workdir")
  if os.path.isdir(workdir) and quant.is_quantized(workdir):
    raise ValueError(f"--workdir={workdir} is already quantised; quantise the float run")
  run = loader.open_run(workdir, step=step)
  config, variables = quant.quantize_run(run, bits, group_size, step)
  os.makedirs(out, exist_ok=True)
  quant.save_weights(out, variables)
  workdir_lib.save_config(out, config)
  if run.labels is not None:
    workdir_lib.save_labels(out, run.labels)
  return {"fp32_bytes": quant.weight_bytes(run.task.peft.merge(run.variables)),
          "quantized_bytes": quant.weight_bytes(variables)}


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError("give --workdir (the run to quantise) and --out (a new directory)")
  with cli.user_errors("quantize"):
    sizes = quantize_dir(f.workdir, f.out, f.bits, f.group_size, f.step)
  before, after = sizes["fp32_bytes"], sizes["quantized_bytes"]
  print(f"weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
        f"({after / before:.3f}x) int{f.bits}; saved to {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
