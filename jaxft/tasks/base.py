"""The interface every task implements. The train loop calls only these.

    init(rng, seq_len)                      boxed variables of the model for a dummy batch
    loss(params, batch, rng, deterministic) (sum of losses, aux sums): aux has "weight" (what
                                            the loss sum is divided by: tokens, examples),
                                            "tokens" (real input tokens, for tokens/s) and
                                            "correct" (accuracy numerator over weight)
    train_iterator(seed, process_index, process_count)   endless checkpointable grain iterator
    eval_batches(split, ...)                fixed-shape batches of a split, the same every call
    eval_outputs(params, batch)             jitted per batch; the host collects the outputs
    summarize(outputs, split)               -> {metric: float}
    report_split() / report(outputs, split) the held-out split scored with the best params at
                                            the end, as a table and a JSON-able dict
    finish(...)                             end-of-run report (baselines, tables, samples)
"""

import jax.numpy as jnp
import ml_collections

from jaxft.models.registry import build_model, hf_architecture


class Task:
  name = ""  # config.task
  head = ""  # the registry head (jaxft/models/registry.py)
  # Early stopping default: (metric, "max" | "min"); config.early_stopping.metric overrides.
  default_metric = ("loss", "min")
  has_labels = False

  def __init__(self, config: ml_collections.ConfigDict, labels: list[str] | None = None):
    self.config = config
    self.labels = labels
    num_labels = len(labels) if labels else 0
    self.model, self.model_cfg = build_model(config.model, self.head, num_labels)
    self.architecture = hf_architecture(config.model.get("family", "gpt2"), self.head)

  def num_train_examples(self) -> int | None:
    """Rows of one training epoch (None: a stream without epochs, e.g. packed LM text)."""
    return None

  def init(self, rng, seq_len: int):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, jnp.ones_like(tokens))

  def report_split(self) -> str | None:
    """The held-out split scored (with the best params) and reported at the end of training."""
    return None

  def report(self, outputs, split: str) -> tuple[str, dict]:
    """(printable table, JSON-able dict) of one evaluation pass; default: the summary."""
    summary = self.summarize(outputs, split)
    return "\n".join(f"{k}: {v:.4f}" for k, v in summary.items()), summary

  def finish(self, workdir: str, params, val: dict, eval_batches) -> None:
    """End of training (process 0): print what a user wants to see."""
