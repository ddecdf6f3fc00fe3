"""Rotary position embeddings (Su et al. 2021) as the Llama-style families apply them.

The "rotate half" layout of Hugging Face's Llama (not the interleaved pairs of the original
paper): a head's dimensions [x1 | x2] rotate as [x1·cos - x2·sin | x2·cos + x1·sin] with the
frequencies repeated over both halves. Angles are computed in float32 from the token
positions, so packed rows (positions restarting per segment) and decoding (positions past the
prompt) get exactly the rotation of a sequence that starts at their own segment.

Scaling for long contexts, as transformers' `rope_parameters` / `rope_scaling` name them:
"default" (none), "linear" (positions divided by `factor`, i.e. frequencies divided) and
"llama3" (Llama 3.1's frequency-dependent interpolation between the scaled and unscaled
frequencies). Other types (dynamic NTK, YaRN, LongRoPE) change the attention scale or depend
on the sequence length and are refused by the config reader (jaxft/hf/decoder_config.py).
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
  """One rotary embedding: base frequency and scaling."""

  theta: float = 10_000.0
  type: str = "default"  # TYPES
  factor: float = 1.0  # linear, llama3
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_max_positions: int = 8192  # llama3: the context the base model was trained on

  def inverse_frequencies(self, head_dim: int) -> np.ndarray:
    """[head_dim / 2] float32, as transformers computes them (float32 throughout)."""
    if self.type not in TYPES:
      raise ValueError(f"rope type {self.type!r} is not implemented; jaxft has {TYPES}")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
    if self.type == "linear":
      return (inv / np.float32(self.factor)).astype(np.float32)
    if self.type == "llama3":
      low_wavelen = self.original_max_positions / self.low_freq_factor
      high_wavelen = self.original_max_positions / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = ((self.original_max_positions / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor))
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv

  def tables(self, positions, head_dim: int):
    """positions [B, T] int -> (cos, sin) [B, T, head_dim] float32."""
    inv = jnp.asarray(self.inverse_frequencies(head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply(x, cos, sin):
  """x [B, T, N, H] rotated by (cos, sin) [B, T, H]; computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
