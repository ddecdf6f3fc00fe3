"""Exports a jaxft training directory as a Hugging Face model directory.

    python -m jaxft.export --workdir runs/gpt2 --out runs/gpt2/hf [--step N]

The output (config.json, model.safetensors, tokenizer files) loads with the transformers class
of the run's model and head (GPT2LMHeadModel, BertForSequenceClassification, ...; its name is
in config.json "architectures", so AutoModelFor*.from_pretrained(out) works) and
AutoTokenizer.from_pretrained(out). Classifiers carry their label names (id2label). Without
--step the best checkpoint (workdir/best, kept by early stopping) is exported if there is one.
"""

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "jaxft training directory to export")
_OUT = flags.DEFINE_string("out", None, "output directory (created; existing files replaced)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")


def export(workdir: str, out: str, step: int | None = None) -> str:
  from jaxft import checkpoint, hf
  from jaxft.data.tokenizer import load_tokenizer

  config, task, params = checkpoint.load_params(workdir, step)
  hf.save_hf(out, params, task.model_cfg, load_tokenizer(config.data.get("tokenizer") or None),
             architecture=task.architecture, labels=task.labels)
  return os.path.abspath(out)


def main(argv):
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("give --workdir (a jaxft training directory) and --out (where the "
                         "Hugging Face model directory goes)")
  print(f"wrote {export(_WORKDIR.value, _OUT.value, _STEP.value)}")


if __name__ == "__main__":
  app.run(main)
