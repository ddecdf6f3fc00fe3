"""What a run reports while it trains: TensorBoard events and metrics.jsonl (`Writer`), the
progress bar and the loss curve. Only process 0 writes."""

import json
import os

import jax
import tqdm
from tensorboardX import SummaryWriter

from jaxft.run import workdir as workdir_lib


class Writer:
  """TensorBoard (tensorboardX) + metrics.jsonl. Only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      self.jsonl = open(os.path.join(workdir, workdir_lib.METRICS_FILE), "a")

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


def progress_bar(start: int, total: int):
  return tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)


def plot_loss_curve(workdir: str, records: list[dict]) -> str | None:
  """Training and validation loss against step -> workdir/loss_curve.png."""
  train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
  if not train or jax.process_index() != 0:
    return None
  import matplotlib  # heavy (~0.5 s to import): only once a run ends and draws its curve

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
