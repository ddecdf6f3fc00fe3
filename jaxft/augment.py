"""Writes a paraphrase-augmented copy of a labelled dataset (jaxft/inference/paraphrase.py):
the original rows, then k paraphrases of each text with its label, as JSONL.

    python -m jaxft.augment --init_from /models/Qwen2.5-0.5B-Instruct --chat \
        --input train.csv --output train_para.jsonl --k 2 --temperature 0.8 --seed 0
    python -m jaxft.train --config configs/finetune.py:classification \
        --config.data.train=train_para.jsonl --config.data.validation=val.csv ...

--workdir (a jaxft causal LM run) or --init_from (a Hugging Face *ForCausalLM directory);
--template holds {text} (default: DEFAULT_TEMPLATE of jaxft/inference/paraphrase.py); --chat
sends the filled template as a user message through the model's chat template. Back-translation:
run twice, with a template that translates and one that translates back. Online EDA
augmentation during training is config.augment (docs/augmentation.md).
"""

from absl import app, flags

from jaxft.data.textio import ENCODING_ERRORS, Encoding
from jaxft.inference import paraphrase
from jaxft.inference.generating import open_generator
from jaxft.run import cli


def _define_flags() -> None:
  """Only when run as a program: other modules define --workdir too."""
  flags.DEFINE_string("workdir", None, "jaxft causal LM run to paraphrase with")
  flags.DEFINE_integer("step", None, "checkpoint step in --workdir (default: best, else latest)")
  flags.DEFINE_string("init_from", None, "Hugging Face causal LM directory")
  flags.DEFINE_string("input", None, "labelled .csv / .tsv / .jsonl file")
  flags.DEFINE_string("output", None, "JSONL to write: the originals, then the paraphrases")
  flags.DEFINE_string("text_field", "text", "column / key of the text in --input")
  flags.DEFINE_string("label_field", "label", "column / key of the label in --input")
  flags.DEFINE_string("encoding", None, "of --input (any Python codec); default utf-8")
  flags.DEFINE_enum("encoding_errors", None, list(ENCODING_ERRORS), "strict or replace")
  flags.DEFINE_string("template", paraphrase.DEFAULT_TEMPLATE, "prompt with {text}")
  flags.DEFINE_bool("chat", False, "send the filled template through the chat template")
  flags.DEFINE_integer("k", 2, "paraphrases per text")
  flags.DEFINE_integer("max_new_tokens", 64, "tokens per paraphrase at most")
  flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy (k equal copies)")
  flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens; 0 = all")
  flags.DEFINE_float("top_p", 0.95, "nucleus sampling mass; 1 = off")
  flags.DEFINE_integer("seed", 0, "sampling seed (chunk j of --batch_texts texts: seed + j)")
  flags.DEFINE_integer("batch_texts", 8, "texts per generate call")


def main(argv):
  del argv
  f = flags.FLAGS
  if (f.workdir is None) == (f.init_from is None):
    raise app.UsageError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging "
                         "Face causal LM directory)")
  if not f.input or not f.output:
    raise app.UsageError("give --input (a labelled file) and --output (the JSONL to write)")
  sampling = paraphrase.Sampling(k=f.k, max_new_tokens=f.max_new_tokens,
                                 temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                                 seed=f.seed, batch_texts=f.batch_texts)
  with cli.user_errors("augment"):
    paraphrase.check_template(f.template)
    sampling.check()
    encoding = Encoding.of_flags(f.encoding, f.encoding_errors)
    run = open_generator(f.workdir or f.init_from, f.step)
    counts = paraphrase.augment_file(run, f.input, f.output, f.text_field, f.label_field,
                                     f.template, f.chat, sampling, encoding)
  print(f"wrote {f.output}: {counts['originals']} originals + {counts['paraphrases']} "
        f"paraphrases ({counts['empty']} empty paraphrases dropped)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
