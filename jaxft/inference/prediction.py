"""Batch inference of a fine-tuned model on raw records: what `python -m jaxft.predict` writes
(classification: label + probabilities; token classification: entity spans with character
offsets; QA: answer spans), through the one evaluation loop."""

import json
import os

from jaxft.run import evaluation, loader


def read_records(path: str) -> list[dict]:
  """A .txt file (one text per non-empty line) or a .jsonl file (one object per non-empty
  line)."""
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


def check_predicts(run: loader.Run) -> None:
  if not run.task.prediction_fields:
    raise ValueError(f"{run.path} holds a {run.config.task} model; jaxft.predict serves "
                     "classification, token classification and QA runs")


def predict(task, variables, records: list[dict]) -> list[dict]:
  """One JSON-able prediction per record."""
  need = task.prediction_fields
  for i, r in enumerate(records):
    missing = [k for k in need if not isinstance(r.get(k), str)]
    if missing:
      raise ValueError(f"input {i + 1} lacks the string field(s) {missing} that a {task.name} "
                       f"model reads (give .jsonl objects with {', '.join(need)})")
  examples = task.prediction_inputs(records)
  features = task.prediction_features(examples)
  outputs = evaluation.run_batches(evaluation.single_device_eval(task),
                                   task.prediction_batches(features), variables)
  return task.predictions(examples, features, outputs)


def predict_file(run: loader.Run, input_path: str, output_path: str,
                 batch_size: int = 64) -> int:
  """Predicts every record of `input_path` into `output_path` (.jsonl); returns the count."""
  check_predicts(run)
  with run.task.config.unlocked():
    run.task.config.eval_batch_size = batch_size
  rows = predict(run.task, run.variables, read_records(input_path))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return len(rows)
