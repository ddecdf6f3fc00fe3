"""Dropout with half the random-number work of `nn.Dropout`.

`nn.Dropout` draws one 32-bit threefry word per element. On CPU that hashing is a quarter of a
BERT fine-tuning step at 256 tokens: attention dropout alone masks B x H x T x T elements per
layer. Here every 32-bit word yields two 16-bit draws, so the same mask costs half the hashing
(`python -m jaxft.bench` reports the step time). The keep probability is rounded to a multiple
of 2^-16 (a rate of 0.1 becomes 0.100006) and kept values are scaled, in float32, by the
inverse of that rounded probability, so the expected output is the input.

The mask keeps the shape of x, halving only the last axis before the draw, so sharded
activations draw their random bits where they live (jax_threefry_partitionable) and a mask does
not depend on the mesh.

Inside `per_example(row_ids)` (every train step), row r of x draws its mask from
fold_in(key, row_ids[r]): an example gets the same masks whether it sits in the full batch or
in a micro-batch of it, so gradient accumulation with dropout equals the full-batch step.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import linen as nn

_LEVELS = 1 << 16


def keep_threshold(rate: float) -> int:
  """Draws (uint16) below this are kept: round((1 - rate) * 2^16)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
  return round((1.0 - rate) * _LEVELS)


def keep_mask(key, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Boolean mask of `shape`, True with probability keep_threshold(rate) / 2^16."""
  threshold = keep_threshold(rate)
  if threshold in (0, _LEVELS):  # 2^16 does not fit the uint16 comparison
    return jnp.full(shape, threshold == _LEVELS)
  shape = tuple(shape) or (1,)
  last = shape[-1]
  words = jax.random.bits(key, shape[:-1] + ((last + 1) // 2,), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last / 2), 2]
  draws = draws.reshape(shape[:-1] + (draws.shape[-2] * 2,))[..., :last]
  return draws < jnp.uint16(threshold)


# Set by `per_example` while a train step is traced: the examples' indices in the step's batch.
_ROW_IDS = contextvars.ContextVar("jaxft_dropout_row_ids", default=None)


@contextlib.contextmanager
def per_example(row_ids):
  """Dropout inside draws row r's mask from fold_in(key, row_ids[r]) (row_ids: int32 [B], the
  rows' indices in the whole step's batch, so a micro-batch passes the indices of its rows)."""
  token = _ROW_IDS.set(row_ids)
  try:
    yield
  finally:
    _ROW_IDS.reset(token)


def _row_keep_mask(key, rate: float, shape: tuple[int, ...], row_ids) -> jax.Array:
  """keep_mask per row, keyed by example: x of [B * k, ...] (a task that folds k sequences per
  example into the batch axis, row-major) gives example b's j-th sequence the id b * k + j."""
  n = row_ids.shape[0]
  if not shape or shape[0] % n:
    raise ValueError(f"dropout over an activation of shape {shape} inside a step of {n} "
                     "examples: its leading axis must be the batch (or a multiple of it)")
  per = shape[0] // n
  ids = (row_ids.astype(jnp.uint32)[:, None] * per + jnp.arange(per, dtype=jnp.uint32)).ravel()
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)
  return jax.vmap(lambda k: keep_mask(k, rate, shape[1:]).reshape(shape[1:]))(keys)


def dropout(key, rate: float, x: jax.Array) -> jax.Array:
  """Zeroes each element of x with probability ~rate and scales the rest to keep the mean."""
  threshold = keep_threshold(rate)
  if threshold == _LEVELS:
    return x
  if threshold == 0:
    return jnp.zeros_like(x)
  row_ids = _ROW_IDS.get()
  if row_ids is None:
    keep = keep_mask(key, rate, x.shape).reshape(x.shape)
  else:
    keep = _row_keep_mask(key, rate, x.shape, row_ids)
  return jnp.where(keep, x.astype(jnp.float32) * (_LEVELS / threshold), 0).astype(x.dtype)


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout(rate)(x, deterministic=...)`; draws from the "dropout" rngs."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(self.make_rng("dropout"), self.rate, x)
