"""Symmetric weight-only quantisation of one weight: int8 per output channel, int4 in groups
along the input (reduction) dimension.

A weight is seen as a matrix whose reduction axis is K (the inputs a matmul sums over) and
whose other axis holds the output channels:

    kernel     (nn.Dense / nn.DenseGeneral)  [*batch, *in, *out] -> view [*batch, K, N]
    embedding  (nn.Embed, also a tied LM head) [*batch, V, D]    -> view [*batch, V, D], K = D

(`batch`: the leading "layers" axis of a scanned stack; each layer gets its own scales.) K is
split into groups of `group` inputs; every (group, output channel) pair has one float32 scale

    scale = max|w| / qmax  (1 where the group is all zero),  q = clip(round(w / scale), ±qmax)

with round-half-to-even and qmax 127 (int8) or 7 (int4: symmetric -7..7, so -8 is never used
and zero stays exact). int8 is the one-group case: one scale per output channel (per row of an
embedding table). int4 values are packed two per byte (uint8, two's complement; see
pack_int4), since safetensors has no 4-bit dtype and jnp.int4 arrays are not packed on every
backend; `dequantize` unpacks them inside jit.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BITS = (8, 4)
QMAX = {8: 127, 4: 7}
KINDS = ("kernel", "embedding")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight's axes map onto the [K, N] view: `kind` (KINDS), leading batch axes, and for
  a kernel how many of the remaining axes are inputs (DenseGeneral over (heads, head_dim): 2)."""

  kind: str
  n_batch: int = 0
  n_in: int = 1

  def view(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(the 3-axis-per-matrix view [*batch, A, B], the index of K in it)."""
    batch, rest = tuple(shape[:self.n_batch]), shape[self.n_batch:]
    if self.kind == "embedding":
      if len(rest) != 2:
        raise ValueError(f"an embedding table is [V, D] (after {self.n_batch} batch axes), "
                         f"not {shape}")
      return batch + tuple(rest), -1
    k, n = math.prod(rest[:self.n_in]), math.prod(rest[self.n_in:])
    return batch + (k, n), -2

  def k(self, shape) -> int:
    view, axis = self.view(shape)
    return view[axis]

  def grouped(self, shape, group: int) -> tuple[tuple[int, ...], int]:
    """(the view with K split into [K // group, group], the index of the group axis)."""
    view, axis = self.view(shape)
    k = view[axis]
    if k % group:
      raise ValueError(f"group size {group} does not divide the weight's input size {k}")
    if axis == -1:  # [*b, V, D] -> [*b, V, G, g]
      return view[:-1] + (k // group, group), -1
    return view[:-2] + (k // group, group, view[-1]), -2  # [*b, K, N] -> [*b, G, g, N]


def group_for(k: int, bits: int, group_size: int) -> int:
  """int8: all of K (per output channel). int4: `group_size`, or where it does not divide K,
  the divisor of K nearest to it (the smaller on a tie): Llama demo's 344-wide MLP with group
  128 gets groups of 86, a 172-wide one with group 32 groups of 43."""
  if bits == 8:
    return k
  if group_size < 1:
    raise ValueError(f"--group_size={group_size} must be a positive number of inputs")
  return min((g for g in range(1, k + 1) if k % g == 0), key=lambda g: (abs(g - group_size), g))


@struct.dataclass
class QArray:
  """A quantised weight: a pytree whose leaves (`values`, `scale`) are what memory holds."""

  values: jax.Array  # int8 [shape] (8 bits) or uint8 [ceil(size / 2)] packed nibbles (4 bits)
  scale: jax.Array  # float32, the grouped view's shape with the group axis of size 1
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  dtype: str = struct.field(pytree_node=False)  # of the float weight (what dequantize returns)
  bits: int = struct.field(pytree_node=False)
  layout: Layout = struct.field(pytree_node=False)

  @property
  def group(self) -> int:
    _, axis = self.layout.view(self.shape)  # the groups' axis sits just before the group's
    return self.layout.k(self.shape) // self.scale.shape[axis - 1]


def check_bits(bits: int) -> None:
  if bits not in BITS:
    raise ValueError(f"--bits={bits} is not supported; use 8 (int8, per output channel) or 4 "
                     "(int4, grouped along the input dimension, see --group_size)")


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int values in [-8, 7] -> uint8 [ceil(size / 2)]: the flattened first half in the low
  nibbles, the second half in the high ones (two's complement; an odd count padded with 0).
  Halves rather than neighbours: unpacking is then two shifts and a concatenation, which XLA
  fuses (3x faster on CPU than interleaving neighbours)."""
  nib = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
  if nib.size % 2:
    nib = np.append(nib, np.uint8(0))
  half = nib.size // 2
  return nib[:half] | (nib[half:] << 4)


def unpack_int4(packed: jax.Array, size: int) -> jax.Array:
  """pack_int4's inverse in jnp (runs inside jit): int8 [size]."""
  signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
  low = jnp.left_shift(signed, 4) >> 4  # arithmetic shifts sign-extend each nibble
  return jnp.concatenate([low, signed >> 4])[:size]


def quantize(w, layout: Layout, bits: int, group_size: int = 128) -> QArray:
  """The float weight `w` as a QArray (computed on the host, once)."""
  check_bits(bits)
  w = np.asarray(w)
  dtype = str(w.dtype)
  w32 = w.astype(np.float32)
  group = group_for(layout.k(w.shape), bits, group_size)
  grouped, axis = layout.grouped(w.shape, group)
  view = w32.reshape(grouped)
  amax = np.max(np.abs(view), axis=axis, keepdims=True)
  scale = np.where(amax > 0, amax / QMAX[bits], 1.0).astype(np.float32)
  q = np.clip(np.rint(view / scale), -QMAX[bits], QMAX[bits]).astype(np.int8)
  values = q.reshape(w.shape) if bits == 8 else pack_int4(q)
  return QArray(jnp.asarray(values), jnp.asarray(scale), tuple(w.shape), dtype, bits, layout)


def dequantize(qa: QArray) -> jax.Array:
  """The float weight the QArray stands for: q * scale, in the weight's dtype."""
  size = math.prod(qa.shape)
  q = qa.values if qa.bits == 8 else unpack_int4(qa.values, size)
  grouped, _ = qa.layout.grouped(qa.shape, qa.group)
  w = q.reshape(grouped).astype(jnp.float32) * qa.scale
  return w.reshape(qa.shape).astype(qa.dtype)
