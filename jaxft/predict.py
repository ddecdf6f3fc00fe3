"""Batch inference of a fine-tuned model on raw inputs.

    python -m jaxft.predict --workdir runs/bbc --input texts.txt --output preds.jsonl
    python -m jaxft.predict --init_from HF_DIR --input questions.jsonl --output answers.jsonl
    python -m jaxft.predict --workdir runs/bbc,runs/bbc_seed1,runs/bbc_seed2 --ensemble mean \
        --input texts.txt --output preds.jsonl

--input: a .txt file (one text per line) or .jsonl (objects with "text"; for QA "question" and
"context", optional "id"), decoded as --encoding (default: the run's config.data.encoding, utf-8
for a Hugging Face directory). Writes one JSON object per input line, line n for line n; an empty
input line gets the same keys with its input fields "" and the predicted ones null:
  classification        {"text", "label", "probabilities": {label: p}}
  token classification  {"text", "entities": [{"type", "start", "end", "text"}], "tags"}
                        (words split at whitespace; start/end are character offsets)
  question answering    {"id", "question", "answer", "start", "end", "score"}
                        (start/end: character offsets of the answer in the context)
--init_from reads a Hugging Face directory (BertForSequenceClassification,
BertForTokenClassification, BertForQuestionAnswering, GPT2ForSequenceClassification) with its
tokenizer and label names (id2label). Several --workdir (repeated or comma-separated) predict
as one ensemble, in the same format (docs/ensembles.md: --ensemble mean | vote).
"""

from absl import app, flags

from jaxft.data.textio import ENCODING_ERRORS, Encoding
from jaxft.inference import ensemble, prediction
from jaxft.run import cli, loader


def _define_flags() -> None:
  flags.DEFINE_multi_string("workdir", None, "jaxft training directory (uses its best "
                            "checkpoint); several (repeated or comma-separated): their ensemble")
  flags.DEFINE_enum("ensemble", "mean", list(ensemble.MODES), "several --workdir: average the "
                    "members' probabilities, or majority vote")
  flags.DEFINE_string("init_from", None, "Hugging Face model directory instead")
  flags.DEFINE_string("input", None, ".txt (one text per line) or .jsonl file")
  flags.DEFINE_string("output", None, "where the .jsonl predictions go")
  flags.DEFINE_integer("batch_size", 64, "examples per batch")
  flags.DEFINE_string("encoding", None, "of --input (any Python codec: utf-8, latin-1, "
                      "cp1252, ...); default the run's config.data.encoding, else utf-8")
  flags.DEFINE_enum("encoding_errors", None, list(ENCODING_ERRORS), "strict: undecodable "
                    "bytes are an error; replace: decode them as U+FFFD (with a warning); "
                    "default the run's, else strict")
  flags.DEFINE_integer("max_len", None, "tokens per example, --init_from only (default the "
                       "task's: 128, 384 for QA); a --workdir uses its seq_len")


def main(argv):
  del argv
  f = flags.FLAGS
  workdirs = ensemble.split_paths(f.workdir or [])
  if bool(workdirs) == bool(f.init_from):
    raise app.UsageError("give exactly one of --workdir (a jaxft run; several: an ensemble) or "
                         "--init_from (a Hugging Face directory)")
  if not f.input or not f.output:
    raise app.UsageError("give --input (.txt or .jsonl) and --output (.jsonl)")
  with cli.user_errors("predict"):  # a bad run directory, input file or setting: one line
    if len(workdirs) > 1:
      run = ensemble.open_ensemble(workdirs, f.ensemble)
    else:
      run = loader.open_run(workdirs[0] if workdirs else f.init_from,
                            seq_len=None if workdirs else f.max_len)
  try:
    prediction.check_predicts(run)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with cli.user_errors("predict"):
    encoding = Encoding.of_flags(f.encoding, f.encoding_errors, run.config.get("data"))
    n = prediction.predict_file(run, f.input, f.output, f.batch_size, encoding)
  print(f"wrote {n} lines of predictions (one per input line) to {f.output}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
