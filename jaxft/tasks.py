"""Tasks own the loss, the eval sums and their summary; steps.py only sees these callables.

A task wraps a model (from the registry) and knows how its batch maps to the model's inputs.
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxft.models.lm_loss import lm_head_cross_entropy
from jaxft.models.registry import build_model


def token_cross_entropy(logits, targets):
  """Per-token -log p(target), softmax in float32. Shifted labels: no [B, T, V] slice copy."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - target_logit


class CausalLM:
  """Next-token prediction over packed rows (inputs/targets/loss_mask/positions/segment_ids)."""

  name = "causal_lm"

  def __init__(self, config: ml_collections.ConfigDict):
    self.model, self.model_cfg = build_model(config.model)
    self.loss_chunk = config.get("lm_loss_chunk", 0)
    if config.seq_len > self.model_cfg.n_positions:
      raise ValueError(f"config.seq_len={config.seq_len} exceeds config.model.n_positions="
                       f"{self.model_cfg.n_positions}; lower seq_len or raise n_positions")

  def init(self, rng, seq_len: int):
    """Boxed (logically partitioned) variables for a [1, seq_len] dummy batch."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.model.init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))

  def _forward(self, params, batch, rng, deterministic, method="__call__"):
    return self.model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
        method=method)

  def loss(self, params, batch, rng, deterministic: bool = False):
    """(sum of masked token losses, aux sums). The step divides by the global token count."""
    mask = batch["loss_mask"].astype(jnp.float32)
    if self.loss_chunk:  # fused LM head + softmax over sequence chunks (jaxft/models/lm_loss.py)
      hidden = self._forward(params, batch, rng, deterministic, method="hidden")
      embedding = self.model.apply({"params": params}, method="embedding")
      loss_sum, correct = lm_head_cross_entropy(hidden, embedding, batch["targets"], mask,
                                                chunk=self.loss_chunk)
      return loss_sum, {"tokens": jnp.sum(mask), "correct": correct}
    logits = self._forward(params, batch, rng, deterministic)
    losses = token_cross_entropy(logits, batch["targets"])
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(losses * mask), {"tokens": jnp.sum(mask), "correct": jnp.sum(correct * mask)}

  def eval_sums(self, params, batch):
    loss_sum, aux = self.loss(params, batch, None, deterministic=True)
    return {"loss_sum": loss_sum, **aux}

  @staticmethod
  def summarize(sums) -> dict[str, float]:
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["loss_sum"]) / tokens
    return {"loss": loss, "perplexity": float(jnp.exp(loss)),
            "accuracy": float(sums["correct"]) / tokens}


def make_task(config: ml_collections.ConfigDict):
  if config.task == "causal_lm":
    return CausalLM(config)
  raise ValueError(f"config.task={config.task!r} is unknown; jaxft has: causal_lm")
