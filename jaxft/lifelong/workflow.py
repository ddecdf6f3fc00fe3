"""A continual-learning run: stages trained one after the other (each a train_and_evaluate in
its own workdir: stages.stage_dirs), the accuracy on every earlier stage's test classes
measured after each, and the forgetting report (report.py). Rerunning continues: a stage whose
stage.json exists is done; an interrupted stage resumes from its checkpoint (train_and_evaluate
does)."""

import json
import logging
import os

import ml_collections
import numpy as np

from jaxft.data import labeled
from jaxft.lifelong import report
from jaxft.lifelong import stages as stages_lib
from jaxft.lifelong.stages import Options
from jaxft.run import evaluation, loader
from jaxft.training import train_and_evaluate

log = logging.getLogger("jaxft")

STAGE_FILE = "stage.json"


def parse_stages(specs: list[str]) -> list[list[str]]:
  """["business,politics", "sport"] -> [["business", "politics"], ["sport"]]."""
  out = [[n.strip() for n in s.split(",") if n.strip()] for s in specs]
  if len(out) < 1 or any(not s for s in out):
    raise ValueError(f"--stage {specs}: give each stage's labels, comma-separated, one --stage "
                     "per stage (at least one label each)")
  return out


def all_labels(config: ml_collections.ConfigDict) -> list[str]:
  """The head's label set: config.data.labels, else every label of the training split."""
  if config.data.get("labels", ""):
    return [n.strip() for n in config.data.labels.split(",") if n.strip()]
  train = labeled.load_splits(config.data, "classification")["train"]
  return sorted({e["label"] for e in train})


def _check(stage_labels: list[list[str]], labels: list[str]) -> None:
  unknown = sorted({n for s in stage_labels for n in s} - set(labels))
  if unknown:
    raise ValueError(f"--stage names label(s) {unknown} the data does not have; its labels are "
                     f"{labels}")


def accuracies(run, labels: list[str], subsets: list[list[str]]) -> list[float]:
  """Test accuracy of a trained run on each subset's examples (argmax over all labels): one
  pass over the whole test split, scored per subset."""
  task = stages_lib.own_data_task(run.config, labels, [])
  outputs = evaluation.run_batches(evaluation.single_device_eval(task),
                                   task.eval_batches("test"), run.variables)
  y = task.features("test")["labels"]
  right = np.argmax(task.gather(outputs, "logits", len(y)), axis=-1) == y
  out = []
  for subset in subsets:
    mine = np.isin(y, [task.label_ids[n] for n in subset])
    if not mine.any():
      raise ValueError(f"the test split has no example of the stage labels {subset}: each "
                       "stage needs test examples to be scored (a larger test split)")
    out.append(float(np.mean(right[mine])))
  return out


def _read_stage(directory: str) -> dict | None:
  path = os.path.join(directory, STAGE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_stages(base: ml_collections.ConfigDict, root: str, stage_labels: list[list[str]],
               opts: Options) -> dict:
  """Trains the stages of one strategy (stages.stage_dirs: in root/<strategy>/stage_k, stage 0
  of full fine-tuning in root/stage_0); returns (and writes in root/<strategy>) the report.
  Stage k's row of the accuracy matrix is measured right after it trains."""
  opts.check()
  if base.task != "classification":
    raise ValueError(f"continual learning runs class-incremental classification stages; "
                     f"config.task={base.task!r} (use configs/finetune.py:bbc_news or "
                     ":classification)")
  labels = all_labels(base)
  _check(stage_labels, labels)
  t = len(stage_labels)
  dirs = stages_lib.stage_dirs(root, opts.strategy, t)
  os.makedirs(os.path.join(root, opts.strategy), exist_ok=True)
  matrix = []
  for k in range(t):
    done = _read_stage(dirs[k])
    if done is not None:
      if done["labels"] != stage_labels[k]:
        raise ValueError(f"{dirs[k]} trained stage {k} on {done['labels']}, not "
                         f"{stage_labels[k]}: rerun with the same --stage flags, or use a new "
                         "--workdir")
      matrix.append(done["accuracy"] + [None] * (t - k - 1))
      continue
    config = stages_lib.stage_config(base, dirs, k, stage_labels, labels, opts)
    if k > 0 and opts.strategy in ("ewc", "replay"):  # the previous stage's, made on demand
      prev = stages_lib.stage_config(base, dirs, k - 1, stage_labels, labels, opts)
      write = stages_lib.write_ewc if opts.strategy == "ewc" else stages_lib.write_replay
      write(dirs, k - 1, prev, labels, stage_labels, opts)
    log.info("%s stage %d: %s -> %s", opts.strategy, k, stage_labels[k], dirs[k])
    val = train_and_evaluate(config, dirs[k])
    row = _evaluate_row(dirs, k, stage_labels, labels, opts, matrix)
    with open(os.path.join(dirs[k], STAGE_FILE), "w") as f:
      json.dump({"stage": k, "labels": stage_labels[k], "accuracy": row,
                 "validation": {m: float(v) for m, v in val.items()}}, f, indent=2)
    matrix.append(row + [None] * (t - k - 1))
  return report.write(os.path.join(root, opts.strategy), opts.strategy, stage_labels, matrix)


def _evaluate_row(dirs, k, stage_labels, labels, opts, matrix) -> list[float]:
  """R[k][0..k]. LoRA: stage i's classes by stage i's adapter, which later stages never
  change, so R[k][i] = R[i][i] (read from the matrix) for i < k."""
  run = loader.open_run(dirs[k])
  if opts.strategy == "lora":
    return [matrix[i][i] for i in range(k)] + accuracies(run, labels, [stage_labels[k]])
  return accuracies(run, labels, stage_labels[:k + 1])


def run_continual(base: ml_collections.ConfigDict, workdir: str, stage_specs: list[str],
                  strategies: list[str], **options) -> dict:
  """Each strategy's stages (workdir/stage_0, workdir/<strategy>/stage_k), then the comparison
  of all of them (workdir/report.json, report.md). options: Options' fields but strategy."""
  stage_labels = parse_stages(stage_specs)
  if not strategies or len(set(strategies)) != len(strategies):
    raise ValueError(f"--strategy {strategies}: give one or more distinct strategies of "
                     f"{', '.join(stages_lib.STRATEGIES)}")
  for s in strategies:  # every strategy's options are checked before any stage trains
    Options(strategy=s, **options).check()
  reports = {s: run_stages(base, workdir, stage_labels, Options(strategy=s, **options))
             for s in strategies}
  return report.write_comparison(workdir, reports)
