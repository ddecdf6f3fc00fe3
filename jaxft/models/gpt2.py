"""GPT-2 in flax.linen, architecturally identical to Hugging Face's GPT2LMHeadModel.

Learned absolute positions, pre-LayerNorm blocks, tanh-approximated GELU ("gelu_new"), a LM head
tied to the token embedding, and GPT-2's three dropouts (embedding, attention probabilities,
residual). q/k/v are separate [embed, heads, head_dim] kernels instead of HF's packed c_attn so
that tensor parallelism shards whole heads; `jaxft.hf` splits and packs them on conversion.

Every parameter carries logical axis names (see `configs/*.py` for the rules that map them to
the mesh). Attention itself (masks from segment ids, the KV cache that `decode=True` keeps in the
"cache" collection for prefill and single-token decoding, the PEFT prefix hook, the kernel that
`attention_impl` picks) lives in jaxft/models/attention.py; this module owns the projections.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxft.models import attention, flops, layers
from jaxft.models.dropout import Dropout
from jaxft.parallel import sharding

Dtype = Any


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  head_dim: int = 0  # 0 = n_embd // n_head (trimmed models: heads pruned)
  n_inner: int = 0  # the MLP width; 0 = 4 * n_embd (HF's n_inner=None)
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32  # compute dtype of matmuls; params stay in param_dtype
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # layers.REMAT_POLICIES: what the backward pass keeps of each block
  scan_layers: bool = False  # one nn.scan over the blocks (compiles once; params [n_layer, ...])
  attention_impl: str = "xla"  # attention.IMPLEMENTATIONS: the kernel (compute only)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.n_embd // self.n_head

  @property
  def mlp_width(self) -> int:
    return self.n_inner or 4 * self.n_embd

  context_field = "n_positions"  # the config.model field of the context length (in messages)

  @property
  def context_length(self) -> int:
    return self.n_positions

  @property
  def lm_head_path(self) -> str:  # the tied embedding
    return "transformer/wte/embedding"

  @property
  def attention_spec(self) -> attention.Spec:
    return attention.Spec(self.attention_impl, causal=True, dropout_rate=self.attn_pdrop,
                          dropout_field="config.model.attn_pdrop", dtype=self.dtype)

  @property
  def flops_backbone(self) -> flops.Backbone:
    d, w = self.n_embd, self.n_head * self.dim_per_head  # w = d unless trimmed
    # q, k, v, out: 4·d·w, MLP d -> ff -> d: 2·d·ff (12·d² for the original GPT-2)
    return flops.Backbone(self.n_layer, d, w, 4 * d * w + 2 * d * self.mlp_width, causal=True)


def _dense_init(cfg: GPT2Config, scale: float = 1.0):
  return nn.initializers.normal(stddev=cfg.initializer_range * scale)


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


def LayerNorm(cfg, name=None):  # noqa: N802 (a module factory)
  return layers.LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name=name)


class Attention(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x, segment_ids, *, deterministic: bool, decode: bool):
    cfg = self.cfg
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (cfg.n_head, cfg.dim_per_head), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=_partitioned(_dense_init(cfg), ("embed", "heads", "kv")),
        bias_init=_partitioned(nn.initializers.zeros, ("heads", "kv")))
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # [B, T, H, Dh]
    q = sharding.constrain(q, ("batch", "length", "act_heads", "kv"))
    out = attention.attend(self, q, k, v, segment_ids, cfg.attention_spec,
                           deterministic=deterministic, decode=decode)  # [B, T, H, Dh]
    out = nn.DenseGeneral(
        cfg.n_embd, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out",
        kernel_init=_partitioned(_dense_init(cfg, (2 * cfg.n_layer) ** -0.5),
                                 ("heads", "kv", "embed")),
        bias_init=_partitioned(nn.initializers.zeros, ("embed",)))(out)
    return Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)


class MLP(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    h = nn.Dense(cfg.mlp_width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc",
                 kernel_init=_partitioned(_dense_init(cfg), ("embed", "mlp")),
                 bias_init=_partitioned(nn.initializers.zeros, ("mlp",)))(x)
    h = sharding.constrain(h, ("batch", "length", "act_mlp"))
    h = jax.nn.gelu(h, approximate=True)  # HF "gelu_new"
    h = nn.Dense(cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="proj",
                 kernel_init=_partitioned(_dense_init(cfg, (2 * cfg.n_layer) ** -0.5),
                                          ("mlp", "embed")),
                 bias_init=_partitioned(nn.initializers.zeros, ("embed",)))(h)
    return Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class Block(nn.Module):
  cfg: GPT2Config

  @nn.compact
  # The signature layers.block_stack expects: positional flags (static under nn.remat) and a
  # (carry, None) result (nn.scan's form).
  def __call__(self, x, segment_ids, deterministic: bool, decode: bool):
    x = x + Attention(self.cfg, name="attn")(LayerNorm(self.cfg, name="ln_1")(x), segment_ids,
                                             deterministic=deterministic, decode=decode)
    x = x + MLP(self.cfg, name="mlp")(LayerNorm(self.cfg, name="ln_2")(x),
                                      deterministic=deterministic)
    return sharding.constrain(x, ("batch", "length", "act_embed")), None


class GPT2Model(nn.Module):
  """The backbone: token ids -> final hidden states [B, T, D] (after ln_f)."""

  cfg: GPT2Config

  def setup(self):
    cfg = self.cfg
    self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        embedding_init=_partitioned(_dense_init(cfg), ("vocab", "embed")))
    self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        embedding_init=_partitioned(nn.initializers.normal(0.01),
                                                    (None, "embed")))
    self.h = layers.block_stack(Block, cfg, cfg.n_layer, name="h", remat=cfg.remat,
                                scan=cfg.scan_layers)
    self.ln_f = LayerNorm(cfg)
    self.drop = Dropout(cfg.embd_pdrop)
    self.extend_inputs = layers.ExtendInputs()

  def __call__(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
               decode: bool = False):
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.wte(tokens) + self.wpe(positions)
    x = self.drop(x, deterministic=deterministic)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    length = x.shape[1]
    x, segment_ids = self.extend_inputs(x, segment_ids, decode)
    x = layers.run_blocks(self.h, x, segment_ids, deterministic, decode)
    return self.ln_f(x[:, x.shape[1] - length:])  # drop what extend_inputs prepended

  def logits(self, hidden):
    """Tied LM head: hidden [B, T, D] @ wte.T -> [B, T, V]."""
    logits = self.wte.attend(hidden)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


class GPT2LMHeadModel(nn.Module):
  """Backbone + tied LM head. `__call__` returns logits; `hidden` skips the head."""

  cfg: GPT2Config

  def setup(self):
    self.transformer = GPT2Model(self.cfg)

  def __call__(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
               decode: bool = False):
    return self.transformer.logits(self.hidden(tokens, positions, segment_ids,
                                               deterministic=deterministic, decode=decode))

  def hidden(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
             decode: bool = False):
    return self.transformer(tokens, positions, segment_ids, deterministic=deterministic,
                            decode=decode)

  def logits(self, hidden):
    """The LM head alone: hidden [B, T, D] -> logits [B, T, V] (callers that pick positions
    first, e.g. prompt scoring, run the head on those only)."""
    return self.transformer.logits(hidden)

  def embedding(self):
    """The tied [V, D] token embedding, for losses that fuse the LM head (see heads.py)."""
    return self.transformer.wte.embedding
