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


class RMSNorm(nn.Module):
  """RMS norm (no mean, no bias) over the last axis, statistics in float32.

  plus_one (Gemma): the stored weight w scales by (1 + w) and starts at 0, and the product is
  taken before the cast back to the compute dtype; otherwise (Llama, Qwen, Mistral) the
  normalised input is cast first and then scaled by w, which starts at 1. Both as transformers
  computes them, so bfloat16 runs round as theirs do. `axis_name`: the logical axis of the
  weight ("embed", or "kv" for the per-head q/k norms of Qwen 3 and Gemma 3)."""

  epsilon: float
  plus_one: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    w = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                   (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    if self.plus_one:
      return (y * (1.0 + w)).astype(self.dtype)
    return (w * y.astype(self.dtype)).astype(self.dtype)


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
  """Extension point inside attention (jaxft/models/attention.py, after the KV cache): may
  prepend key/value positions that every query sees (PEFT prefix tuning, jaxft/peft/prompts.py).
  Identity here; no parameters of its own."""

  @nn.compact
  def __call__(self, k, v, mask):
    """k, v [B, Tk, K, H] (K KV heads), mask [B, Tq, Tk] -> the same with Tk grown."""
    return k, v, mask


# config.model.remat -> what the backward pass keeps of each block (jax.checkpoint policies).
REMAT_POLICIES = {
    "none": None,  # keep every activation: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs; recompute all
    # keep the weight matmuls' outputs; recompute attention scores and elementwise ops
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,  # ... and the attention matmuls too
}
# Variable collections a scanned stack carries per layer (stacked on a leading axis).
_PER_LAYER = ("params", "peft", "cache")


def block_stack(block_cls, cfg, n: int, *, name: str, remat: str, scan: bool):
  """`n` layers of `block_cls(cfg)`, rematerialised by policy `remat` (REMAT_POLICIES).

  Without `scan`: a list of modules `{name}_0` .. `{name}_{n-1}` (the layout of HF's tables).
  With `scan`: one nn.scan module `name` whose params (and PEFT variables, KV caches) have a
  leading "layers" axis: XLA compiles the block once instead of n times. `jaxft.hf` stacks and
  unstacks on conversion, so checkpoints move between the two layouts through HF tensors.

  A block is called as block(x, aux, deterministic, decode) -> (x, None): nn.scan's
  (carry, per-step output) form; `aux` (segment ids, attention mask) is the same for every layer.
  Run the result with `run_blocks`.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r} is unknown; use one of "
                     f"{list(REMAT_POLICIES)}")
  cls = block_cls
  if remat != "none":
    # deterministic and decode (args 3 and 4, self being 0) are Python bools: static.
    # prevent_cse is not needed inside scan, whose loop already stops XLA from merging the
    # recomputation with the forward pass (and it costs there).
    cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=(3, 4),
                   prevent_cse=not scan)
  if not scan:
    return [cls(cfg, name=f"{name}_{i}") for i in range(n)]
  return nn.scan(cls, length=n, variable_axes={c: 0 for c in _PER_LAYER},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                 metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name=name)


def run_blocks(blocks, x, aux, deterministic: bool, decode: bool = False):
  """Applies a `block_stack` (either layout) to x."""
  if isinstance(blocks, (list, tuple)):
    for block in blocks:
      x, _ = block(x, aux, deterministic, decode)
    return x
  x, _ = blocks(x, aux, deterministic, decode)
  return x
