"""What a run reports: TensorBoard events, a metrics.jsonl, the progress bar, the loss curve,
FLOP/MFU estimates and the run's provenance (config, git SHA, package versions)."""

import functools
import importlib.metadata
import json
import os
import platform
import subprocess

import jax
import tqdm

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "tensorflow-datasets", "ml-collections", "tokenizers", "numpy")


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N (non-embedding params + the LM-head matmul) plus attention
  6·L·T·D (the 12·L·D·T score/value matmuls, halved because causal masking skips half).

  For BERT (bidirectional: the full 12·L·T·D) the head is left out: classifier heads are tiny
  and the MLM head only scores the masked positions."""
  if hasattr(model_cfg, "hidden_size"):
    d, n_layer, ff = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.intermediate_size
    return 6.0 * n_layer * (4 * d * d + 2 * d * ff) + 12.0 * n_layer * seq_len * d
  d, n_layer, vocab = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size
  block_params = n_layer * (12 * d * d + 13 * d)  # qkv+out (4d²), mlp (8d²), biases, norms
  return 6.0 * (block_params + d * vocab) + 6.0 * n_layer * seq_len * d


def peak_flops_per_device() -> tuple[float, str]:
  """Peak dense FLOP/s of one local device and where the number comes from."""
  kind = jax.devices()[0].device_kind.lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12, "v5e": 197e12,
           "v4": 275e12, "v5p": 459e12, "v6": 918e12, "l4": 121e12}
  for key, flops in table.items():
    if key in kind:
      return flops, f"{kind} bf16 dense peak"
  if jax.devices()[0].platform != "cpu":
    return float("nan"), f"{kind}: peak unknown to jaxft.metrics"
  # CPU devices of one process share the host's cores: each gets its share of the host peak.
  share = jax.local_device_count()
  if os.environ.get("JAXFT_CPU_PEAK_FLOPS"):
    return (float(os.environ["JAXFT_CPU_PEAK_FLOPS"]) / share,
            "host CPU peak from JAXFT_CPU_PEAK_FLOPS")
  return cpu_matmul_ceiling() / share, "measured host CPU f32 matmul ceiling"


@functools.cache
def cpu_matmul_ceiling(n: int = 2048, repeats: int = 4) -> float:
  """FLOP/s of the fastest of `repeats` jitted f32 [n, n] @ [n, n] on this host's CPU devices
  (~1 s). CPUs publish no single peak (cores, vector units and clocks vary), so MFU on CPU is
  measured against what XLA's own matmul reaches here."""
  import time

  import jax.numpy as jnp

  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def git_sha() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def write_run_info(workdir: str) -> None:
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  info = {"git_sha": git_sha(), "python": platform.python_version(), "packages": versions,
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=2)


class Writer:
  """TensorBoard (tensorboardX) + metrics.jsonl. Only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.tb.add_scalar(name, value, step)
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress_bar(start: int, total: int):
  return tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)


def plot_loss_curve(workdir: str, records: list[dict]) -> str | None:
  """Training and validation loss against step -> workdir/loss_curve.png."""
  train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
  if not train or jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use("Agg")  # no display on servers
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*train), label="train loss", lw=1)
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, "loss_curve.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
