"""The files of a run directory besides checkpoints: config.json (the resolved config),
labels.json (label names in id order), run_info.json (git SHA, package versions, devices) and
metrics.jsonl (one record per logged step; written by jaxft/run/logs.py)."""

import importlib.metadata
import json
import os
import platform
import subprocess

import jax
import ml_collections

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "ml-collections", "tokenizers", "numpy")


def is_workdir(path: str) -> bool:
  """A jaxft training (or adapter) directory rather than a Hugging Face one (both hold a
  config.json; only jaxft's has a "model" block)."""
  cfg = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return "model" in json.load(f)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir} has no {CONFIG_FILE}: it is not a jaxft "
                            "training directory (train into it with python -m jaxft.train)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_labels(workdir: str, labels: list[str]) -> None:
  with open(os.path.join(workdir, LABELS_FILE), "w") as f:
    json.dump(labels, f, indent=1)


def load_labels(workdir: str) -> list[str] | None:
  path = os.path.join(workdir, LABELS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops the records logged after `step` (the checkpoint a run resumes from): the resumed
  run logs those steps again."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(workdir) if r["step"] <= step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)


def git_sha() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def write_run_info(workdir: str) -> None:
  """Provenance: the code's git SHA, the package versions and the devices of this run."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  info = {"git_sha": git_sha(), "python": platform.python_version(), "packages": versions,
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}
  with open(os.path.join(workdir, RUN_INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
