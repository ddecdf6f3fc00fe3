"""Batch inference of a fine-tuned model on raw records: what `python -m jaxft.predict` writes
(classification: label + probabilities; token classification: entity spans with character
offsets; QA: answer spans), through the one evaluation loop.

The output has exactly one line per input line, so that line n of the predictions belongs to
line n of the input: an empty (or whitespace-only) input line gets a record with the
predictions' keys, its input fields "" and the rest null (`empty_row`).
"""

import json
import os

from jaxft.data import textio
from jaxft.data.errors import BadInputError, bad_input
from jaxft.data.textio import FLAGS_UTF8, Encoding, json_type, json_value
from jaxft.run import evaluation, loader


def read_records(path: str, encoding: Encoding = FLAGS_UTF8) -> list[dict | None]:
  """One entry per line of a .txt file ({"text": the line}) or a .jsonl file (its object);
  None for an empty or whitespace-only line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input={path} does not exist")
  jsonl = path.endswith(".jsonl")
  records: list[dict | None] = []
  for n, line in textio.read_lines(path, encoding):
    if not line.strip():
      records.append(None)
    elif jsonl:
      record = json_value(line, path, n, "a .jsonl --input holds one JSON object per line")
      if not isinstance(record, dict):
        raise bad_input(path, n, f"is a JSON {json_type(record)}, not an object",
                        "a .jsonl --input holds one JSON object per line")
      records.append(record)
    else:
      records.append({"text": line.rstrip("\n")})
  if all(r is None for r in records):
    raise BadInputError(f"--input={path} holds no inputs (every line is empty); give one input "
                        "per line", path)
  return records


def check_predicts(run: loader.Run) -> None:
  if not run.task.prediction_fields:
    raise ValueError(f"{run.path} holds a {run.config.task} model; jaxft.predict serves "
                     "classification, token classification and QA runs")


def _missing(task, record: dict) -> list[str]:
  return [k for k in task.prediction_fields if not isinstance(record.get(k), str)]


def check_records(task, records: list[dict | None], path: str) -> None:
  """Every non-empty line holds the string fields the task reads."""
  need = ", ".join(task.prediction_fields)
  for n, r in enumerate(records, 1):
    missing = [] if r is None else _missing(task, r)
    if missing:
      raise bad_input(path, n, f"lacks the string field(s) {missing} that a {task.name} model "
                      f"reads (its fields are {sorted(r)})", f"give .jsonl objects with {need}")


def predict(task, variables, records: list[dict]) -> list[dict]:
  """One JSON-able prediction per record."""
  need = task.prediction_fields
  for i, r in enumerate(records):
    missing = _missing(task, r)
    if missing:
      raise ValueError(f"input {i + 1} lacks the string field(s) {missing} that a {task.name} "
                       f"model reads (give .jsonl objects with {', '.join(need)})")
  examples = task.prediction_inputs(records)
  features = task.prediction_features(examples)
  outputs = evaluation.run_batches(evaluation.single_device_eval(task),
                                   task.prediction_batches(features), variables)
  return task.predictions(examples, features, outputs)


def empty_row(task, keys) -> dict:
  """The output line of an empty input line: the predictions' keys, the input fields "" (there
  was no text) and the predicted ones null (nothing was predicted)."""
  return {k: "" if k in task.prediction_fields else None for k in keys}


def predict_lines(task, variables, records: list[dict | None]) -> list[dict]:
  """One output row per entry of `records` (read_records): predictions, and empty_row for None."""
  rows = iter(predict(task, variables, [r for r in records if r is not None]))
  out = [None if r is None else next(rows) for r in records]
  keys = next(row for row in out if row is not None).keys()
  return [empty_row(task, keys) if row is None else row for row in out]


def predict_file(run: loader.Run, input_path: str, output_path: str, batch_size: int = 64,
                 encoding: Encoding | None = None) -> int:
  """Predicts every line of `input_path` into `output_path` (.jsonl, one line per input line);
  returns the number of lines. `encoding` None: the run's config.data.encoding (utf-8 for a
  Hugging Face directory), named as the CLI's flags in messages."""
  check_predicts(run)
  if encoding is None:
    encoding = Encoding.of_flags(None, None, run.config.get("data"))
  records = read_records(input_path, encoding)
  check_records(run.task, records, input_path)
  with run.task.config.unlocked():
    run.task.config.eval_batch_size = batch_size
  rows = predict_lines(run.task, run.variables, records)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return len(rows)
