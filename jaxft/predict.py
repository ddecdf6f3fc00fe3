"""Batch inference of a fine-tuned model on raw inputs.

    python -m jaxft.predict --workdir runs/bbc --input texts.txt --output preds.jsonl
    python -m jaxft.predict --init_from HF_DIR --input questions.jsonl --output answers.jsonl

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
tokenizer and label names (id2label).
"""

from absl import app, flags

from jaxft.data.textio import ENCODING_ERRORS, Encoding
from jaxft.inference import prediction
from jaxft.run import cli, loader

_WORKDIR = flags.DEFINE_string("workdir", None, "jaxft training directory (uses its best "
                               "checkpoint)")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Hugging Face model directory instead")
_INPUT = flags.DEFINE_string("input", None, ".txt (one text per line) or .jsonl file")
_OUTPUT = flags.DEFINE_string("output", None, "where the .jsonl predictions go")
_BATCH = flags.DEFINE_integer("batch_size", 64, "examples per batch")
_ENCODING = flags.DEFINE_string("encoding", None, "of --input (any Python codec: utf-8, latin-1, "
                                "cp1252, ...); default the run's config.data.encoding, else utf-8")
_ENCODING_ERRORS = flags.DEFINE_enum("encoding_errors", None, list(ENCODING_ERRORS), "strict: "
                                     "undecodable bytes are an error; replace: decode them as "
                                     "U+FFFD (with a warning); default the run's, else strict")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "tokens per example, --init_from only (default "
                                "the task's: 128, 384 for QA); a --workdir uses its seq_len")


def main(argv):
  del argv
  if bool(_WORKDIR.value) == bool(_INIT_FROM.value):
    raise app.UsageError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging "
                         "Face directory)")
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("give --input (.txt or .jsonl) and --output (.jsonl)")
  with cli.user_errors("predict"):  # a bad run directory, input file or setting: one line
    run = loader.open_run(_WORKDIR.value or _INIT_FROM.value,
                          seq_len=None if _WORKDIR.value else _MAX_LEN.value)
  try:
    prediction.check_predicts(run)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with cli.user_errors("predict"):
    encoding = Encoding.of_flags(_ENCODING.value, _ENCODING_ERRORS.value, run.config.get("data"))
    n = prediction.predict_file(run, _INPUT.value, _OUTPUT.value, _BATCH.value, encoding)
  print(f"wrote {n} lines of predictions (one per input line) to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
