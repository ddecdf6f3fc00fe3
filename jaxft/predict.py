"""Batch inference of a fine-tuned model on raw inputs.

    python -m jaxft.predict --workdir runs/bbc --input texts.txt --output preds.jsonl
    python -m jaxft.predict --init_from HF_DIR --input questions.jsonl --output answers.jsonl

--input: a .txt file (one text per line) or .jsonl (objects with "text"; for QA "question" and
"context", optional "id"). Writes one JSON object per input line:
  classification        {"text", "label", "probabilities": {label: p}}
  token classification  {"text", "entities": [{"type", "start", "end", "text"}], "tags"}
                        (words split at whitespace; start/end are character offsets)
  question answering    {"id", "question", "answer", "start", "end", "score"}
                        (start/end: character offsets of the answer in the context)
--init_from reads a Hugging Face directory (BertForSequenceClassification,
BertForTokenClassification, BertForQuestionAnswering, GPT2ForSequenceClassification) with its
tokenizer and label names (id2label).
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn

_WORKDIR = flags.DEFINE_string("workdir", None, "jaxft training directory (uses its best "
                               "checkpoint)")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Hugging Face model directory instead")
_INPUT = flags.DEFINE_string("input", None, ".txt (one text per line) or .jsonl file")
_OUTPUT = flags.DEFINE_string("output", None, "where the .jsonl predictions go")
_BATCH = flags.DEFINE_integer("batch_size", 64, "examples per batch")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "tokens per example (default: the run's "
                                "seq_len; 384 for QA from --init_from)")

# transformers class in config.json -> config.task
_TASK_OF = {"BertForSequenceClassification": "classification",
            "GPT2ForSequenceClassification": "classification",
            "BertForTokenClassification": "token_classification",
            "BertForQuestionAnswering": "question_answering"}


def read_records(path: str) -> list[dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input={path} does not exist")
  records = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
      else:
        records.append({"text": line.rstrip("\n")})
  if not records:
    raise ValueError(f"--input={path} holds no inputs")
  return records


def load_from_hf(path: str, max_len: int | None):
  """(task, variables) for a Hugging Face classifier / tagger / QA directory."""
  from configs import finetune
  from jaxft import hf, init_from, tasks

  hf_config = hf.read_hf_config(path)
  architecture = (hf_config.get("architectures") or [""])[0]
  if architecture not in _TASK_OF:
    raise ValueError(f"--init_from={path} holds a {architecture or 'model'} (config.json "
                     f"architectures); jaxft.predict reads {', '.join(_TASK_OF)}")
  config = finetune.base_config()
  with config.unlocked():
    config.task = _TASK_OF[architecture]
    config.init_from = path
    config.seq_len = max_len or (384 if config.task == "question_answering" else 128)
    init_from.resolve(config)
  labels = hf.label_names(hf_config)
  if config.task != "question_answering" and labels is None:
    n = int(hf_config.get("num_labels", len(hf_config.get("id2label", {})) or 2))
    labels = [f"LABEL_{i}" for i in range(n)]
  task = tasks.make_task(config, labels=labels)
  init = lambda: nn.unbox(task.init(jax.random.key(0), config.seq_len))["params"]  # noqa: E731
  params = hf.load_params(path, jax.eval_shape(init), architecture)
  return task, {"params": jax.tree.map(jnp.asarray, params)}


def predict(task, variables, records: list[dict]) -> list[dict]:
  from jaxft.reports import run_eval

  for i, r in enumerate(records):
    need = ("question", "context") if task.name == "question_answering" else ("text",)
    missing = [k for k in need if not isinstance(r.get(k), str)]
    if missing:
      raise ValueError(f"input {i + 1} lacks the string field(s) {missing} that a {task.name} "
                       f"model reads (give .jsonl objects with {', '.join(need)})")
  examples = task.prediction_inputs(records)
  features = task.complete(task.featurize(examples, "predict", with_labels=False))
  outputs = run_eval(task, variables, task.batches(task.device_arrays(features)))
  return task.predictions(examples, features, outputs)


def main(argv):
  del argv
  from jaxft import checkpoint

  if bool(_WORKDIR.value) == bool(_INIT_FROM.value):
    raise app.UsageError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging "
                         "Face directory)")
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("give --input (.txt or .jsonl) and --output (.jsonl)")
  if _WORKDIR.value:
    config, task, variables = checkpoint.load_params(_WORKDIR.value)
    if task.name not in _TASK_OF.values():
      raise app.UsageError(f"--workdir={_WORKDIR.value} trained a {config.task} model; predict "
                           "serves classification, token classification and QA runs")
  else:
    task, variables = load_from_hf(_INIT_FROM.value, _MAX_LEN.value)
  with task.config.unlocked():
    task.config.eval_batch_size = _BATCH.value
  rows = predict(task, variables, read_records(_INPUT.value))
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  print(f"wrote {len(rows)} predictions to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
