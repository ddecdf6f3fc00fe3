"""The interface every task implements. The train loop calls only these.

    init(rng, seq_len)                      boxed variables of the model for a dummy batch
                                            ({"params": ...} and, with PEFT, {"peft": ...})
    loss(variables, batch, rng, deterministic)  (sum of losses, aux sums): aux has "weight" (what
                                            the loss sum is divided by: tokens, examples),
                                            "tokens" (real input tokens, for tokens/s) and
                                            "correct" (accuracy numerator over weight)
    train_iterator(seed, process_index, process_count)   endless checkpointable grain iterator
    eval_batches(split, ...)                fixed-shape batches of a split, the same every call
    eval_outputs(variables, batch)          jitted per batch; the host collects the outputs
    summarize(outputs, split)               -> {metric: float}
    report_split() / report(outputs, split) the held-out split scored with the best params at
                                            the end, as a table and a JSON-able dict
    finish(...)                             end-of-run report (baselines, tables, samples)

Model calls go through `init` / `apply`, which carry the PEFT method of config.peft
(jaxft/peft/): a task never knows which one it is.
"""

import jax.numpy as jnp
import ml_collections

from jaxft import peft
from jaxft.models.registry import build_model, hf_architecture


class Task:
  name = ""  # config.task
  head = ""  # the registry head (jaxft/models/registry.py)
  # Early stopping default: (metric, "max" | "min"); config.early_stopping.metric overrides.
  default_metric = ("loss", "min")
  has_labels = False
  # Regex of the head's params (within "params"): trained even when PEFT freezes the backbone.
  trainable_head = ""

  def __init__(self, config: ml_collections.ConfigDict, labels: list[str] | None = None):
    self.config = config
    self.labels = labels
    num_labels = len(labels) if labels else 0
    self.model, self.model_cfg = build_model(config.model, self.head, num_labels)
    self.architecture = hf_architecture(config.model.get("family", "gpt2"), self.head)
    self.peft = peft.make(config.get("peft"))
    self.peft.check_layout(bool(config.model.get("scan_layers", False)))

  def num_train_examples(self) -> int | None:
    """Rows of one training epoch (None: a stream without epochs, e.g. packed LM text)."""
    return None

  def init(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.init_model(rng, tokens, jnp.ones_like(tokens))

  def init_model(self, rng, *args, **kwargs):
    """model.init with the PEFT method's parameters created alongside the model's."""
    with self.peft.active():
      variables = self.model.init(rng, *args, **kwargs)
    self.peft.check_initialized(variables)
    return variables

  def apply(self, variables, *args, rng=None, deterministic: bool = True, **kwargs):
    """model.apply with the PEFT method; rng feeds dropout when not deterministic."""
    with self.peft.active(deterministic):
      return self.model.apply(variables, *args, deterministic=deterministic,
                              rngs=None if deterministic else {"dropout": rng}, **kwargs)

  def report_split(self) -> str | None:
    """The held-out split scored (with the best params) and reported at the end of training."""
    return None

  def report(self, outputs, split: str) -> tuple[str, dict]:
    """(printable table, JSON-able dict) of one evaluation pass; default: the summary."""
    summary = self.summarize(outputs, split)
    return "\n".join(f"{k}: {v:.4f}" for k, v in summary.items()), summary

  def finish(self, workdir: str, variables, val: dict, eval_batches) -> None:
    """End of training (process 0): print what a user wants to see."""
