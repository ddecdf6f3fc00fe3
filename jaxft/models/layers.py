"""Layers shared by the model families."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class LayerNorm(nn.Module):
  """LayerNorm with logical axis names; statistics in float32 whatever the compute dtype."""

  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       features, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      features, self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class ExtendInputs(nn.Module):
  """Extension point after the embeddings: may prepend positions (PEFT prompt tuning,
  jaxft/peft/prompts.py). The backbone drops whatever it prepended before returning, so heads
  see exactly the positions of their input. Identity here; it holds no parameters of its own."""

  @nn.compact
  def __call__(self, x, segment_ids, decode: bool = False):
    """x [B, T, D], segment_ids [B, T] -> (x [B, P + T, D], segment_ids [B, P + T])."""
    del decode
    return x, segment_ids


class ExtendKeys(nn.Module):
  """Extension point inside attention: may prepend key/value positions that every query sees
  (PEFT prefix tuning, jaxft/peft/prompts.py). Identity here; no parameters of its own."""

  @nn.compact
  def __call__(self, k, v, mask):
    """k, v [B, Tk, H, Dh], mask [B, Tq, Tk] -> the same with Tk grown by the prefix."""
    return k, v, mask
