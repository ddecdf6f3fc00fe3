"""Exports a jaxft training directory as a Hugging Face model directory, or its adapter alone.

    python -m jaxft.export --workdir runs/gpt2 --out runs/gpt2/hf [--step N]
    python -m jaxft.export --workdir runs/lora --out runs/lora/adapter --adapter_only
    python -m jaxft.export --workdir runs/lora --out runs/lora/peft --peft_format

The output (config.json, model.safetensors, tokenizer files) loads with the transformers class
of the run's model and head (GPT2LMHeadModel, BertForSequenceClassification, ...; its name is
in config.json "architectures", so AutoModelFor*.from_pretrained(out) works) and
AutoTokenizer.from_pretrained(out). Classifiers carry their label names (id2label). Without
--step the best checkpoint (workdir/best, kept by early stopping) is exported if there is one.

A LoRA / AdaLoRA run is merged first (W + scale * A B): the export is a plain model. Adapters,
prefix and prompt tuning add computation no plain transformers class has; --adapter_only
writes the trainable variables alone (adapter.safetensors, with the run's config.json and
labels.json), which every jaxft CLI loads as a --workdir on top of the base model named by
config.init_from (or --init_from where it has moved). --peft_format writes a LoRA run's adapter
in Hugging Face PEFT's format instead (adapter_config.json, adapter_model.safetensors), for
peft.PeftModel.from_pretrained(<the base transformers model>, out); config.peft.init_adapter
reads such a directory back.
"""

import os

from absl import app, flags

from jaxft import hf, tasks, trees
from jaxft.hf import peft_adapter
from jaxft.run import checkpoint, cli, loader
from jaxft.run import workdir as workdir_lib


def export(workdir: str, out: str, step: int | None = None, init_from: str | None = None) -> str:
  """Writes a plain Hugging Face model directory (PEFT merged in) to `out`."""
  run = loader.open_run(workdir, step=step, init_from=init_from)
  params = run.task.peft.merge(run.variables)["params"]
  hf.save_hf(out, params, run.task.model_cfg, run.tokenizer(), architecture=run.task.architecture,
             labels=run.task.labels)
  return os.path.abspath(out)


def export_adapter(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the run's trainable variables (no base model) to `out`."""
  config = workdir_lib.load_config(workdir)
  task = tasks.make_task(config, labels=workdir_lib.load_labels(workdir))
  if task.peft.name == "none":
    raise ValueError(f"--workdir={workdir} is a full fine-tuning run (config.peft.method="
                     "'none'): every parameter is trained, so there is no adapter; export the "
                     "whole model (drop --adapter_only)")
  _, trainable = loader.open_trainable(workdir, task, step)
  checkpoint.save_adapter(out, workdir, trainable)
  print(f"{trees.count(trainable):,} trainable parameters ({task.peft.describe()})")
  return os.path.abspath(out)


def export_peft_adapter(workdir: str, out: str, step: int | None = None) -> str:
  """Writes a LoRA run's adapter (and trained head) in Hugging Face PEFT's format to `out`."""
  config = workdir_lib.load_config(workdir)
  task = tasks.make_task(config, labels=workdir_lib.load_labels(workdir))
  lay, trainable = loader.open_trainable(workdir, task, step)
  # The frozen base stays abstract: only its shapes are needed, so init_from is not read.
  variables = trees.combine(lay.split(lay.abstract)[1], trainable)
  peft_adapter.save_peft_adapter(out, task, variables)
  print(f"{trees.count(trainable):,} trainable parameters ({task.peft.describe()})")
  return os.path.abspath(out)


def _define_flags() -> None:
  """Only when run as a program: tests import this module next to jaxft.train's flags."""
  flags.DEFINE_string("workdir", None, "jaxft training directory to export")
  flags.DEFINE_string("out", None, "output directory (created; existing files replaced)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the best, else the latest)")
  flags.DEFINE_boolean("adapter_only", False, "write only the trainable variables (PEFT params "
                       "and head), not a merged model")
  flags.DEFINE_boolean("peft_format", False, "write a LoRA run's adapter in Hugging Face PEFT's "
                       "format (adapter_config.json + adapter_model.safetensors)")
  flags.DEFINE_string("init_from", None, "base model directory, if it has moved since training "
                      "(default: the run's config.init_from)")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError("give --workdir (a jaxft training directory) and --out (where the "
                         "Hugging Face model directory goes)")
  with cli.user_errors("export"):  # a bad workdir, step or base directory: one line
    if f.peft_format:
      print(f"wrote {export_peft_adapter(f.workdir, f.out, f.step)}")
    elif f.adapter_only:
      print(f"wrote {export_adapter(f.workdir, f.out, f.step)}")
    else:
      print(f"wrote {export(f.workdir, f.out, f.step, f.init_from)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
