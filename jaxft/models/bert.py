"""BERT in flax.linen, architecturally identical to Hugging Face's BertModel.

Word + position + token-type embeddings, post-LayerNorm blocks (LayerNorm after each residual
add), exact (erf) GELU, bidirectional attention limited to non-padding tokens, and a tanh pooler
over the first ([CLS]) token. `BertModel.__call__` returns (hidden states [B, T, D], pooled
[B, D]); task heads own everything after that. q/k/v are [embed, heads, head_dim] kernels as in
jaxft's GPT-2, so tensor parallelism shards whole heads; `jaxft.hf` transposes HF's nn.Linear
(out, in) weights into them. Attention itself (the mask from segment ids, the PEFT prefix hook,
the kernel that `attention_impl` picks) lives in jaxft/models/attention.py.
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
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  head_dim: int = 0  # 0 = hidden_size // num_attention_heads (trimmed models: heads pruned)
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  classifier_dropout: float | None = None  # heads' dropout; None = hidden_dropout_prob
  remat: str = "none"  # layers.REMAT_POLICIES: what the backward pass keeps of each layer
  scan_layers: bool = False  # one nn.scan over the layers (compiles once; params [layers, ...])
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "xla"  # attention.IMPLEMENTATIONS: the kernel (compute only)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def attention_spec(self) -> attention.Spec:
    return attention.Spec(self.attention_impl, causal=False,
                          dropout_rate=self.attention_probs_dropout_prob,
                          dropout_field="config.model.attention_probs_dropout_prob",
                          dtype=self.dtype)

  @property
  def flops_backbone(self) -> flops.Backbone:
    d, w = self.hidden_size, self.num_attention_heads * self.dim_per_head  # w = d unless trimmed
    return flops.Backbone(self.num_hidden_layers, d, w, 4 * d * w + 2 * d * self.intermediate_size,
                          causal=False)  # q, k, v, out: 4·d·w, MLP d -> ff -> d


def _init(cfg: BertConfig, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def LayerNorm(cfg, name=None):  # noqa: N802 (a module factory)
  return layers.LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


def dense(cfg: BertConfig, features: int, name: str, axes: tuple[str, str]) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=_init(cfg, axes), bias_init=_zeros(axes[1:]))


class Attention(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, segment_ids, *, deterministic: bool):
    """x [B, T, D]; segment_ids [B, T] (0 = padding)."""
    cfg = self.cfg
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (cfg.num_attention_heads, cfg.dim_per_head), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        name=name, kernel_init=_init(cfg, ("embed", "heads", "kv")),
        bias_init=_zeros(("heads", "kv")))
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # [B, T, H, Dh]
    q = sharding.constrain(q, ("batch", "length", "act_heads", "kv"))
    out = attention.attend(self, q, k, v, segment_ids, cfg.attention_spec,
                           deterministic=deterministic)  # [B, T, H, Dh]
    out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="out",
                          kernel_init=_init(cfg, ("heads", "kv", "embed")),
                          bias_init=_zeros(("embed",)))(out)
    out = Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
    return LayerNorm(cfg, name="ln")(out + x)  # post-LN


class MLP(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    h = dense(cfg, cfg.intermediate_size, "fc", ("embed", "mlp"))(x)
    h = sharding.constrain(h, ("batch", "length", "act_mlp"))
    h = jax.nn.gelu(h, approximate=False)  # HF "gelu": exact erf GELU
    h = dense(cfg, cfg.hidden_size, "proj", ("mlp", "embed"))(h)
    return Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class Layer(nn.Module):
  cfg: BertConfig

  @nn.compact
  # The signature layers.block_stack expects (decode unused: BERT keeps no KV cache).
  def __call__(self, x, segment_ids, deterministic: bool, decode: bool = False):
    del decode
    cfg = self.cfg
    x = Attention(cfg, name="attn")(x, segment_ids, deterministic=deterministic)
    # attn/* and mlp/* scopes as in GPT-2, so PEFT target patterns read the same for both.
    h = MLP(cfg, name="mlp")(x, deterministic=deterministic)
    out = LayerNorm(cfg, name="ln")(h + x)
    return sharding.constrain(out, ("batch", "length", "act_embed")), None


class BertModel(nn.Module):
  """tokens [B, T] -> (hidden [B, T, D], pooled [B, D]).

  `segment_ids` > 0 marks real tokens (0 = padding, as in HF's attention_mask); a query attends
  to every real token of its own segment, so packed rows stay separate. `token_types` are BERT's
  sentence A/B ids (default 0), `positions` default to 0..T-1. Without the pooler (HF's
  add_pooling_layer=False, as in BertForMaskedLM / TokenClassification / QuestionAnswering)
  `pooled` is None. `pool_positions` [B, K] pools those tokens instead of each row's first:
  the [CLS] of each example packed into a row, pooled [B, K, D].
  """

  cfg: BertConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, tokens, segment_ids=None, token_types=None, positions=None, *,
               pool_positions=None, deterministic: bool = True):
    cfg = self.cfg
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = lambda n, name, axes: nn.Embed(  # noqa: E731
        n, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        embedding_init=_init(cfg, axes))
    x = (embed(cfg.vocab_size, "word", ("vocab", "embed"))(tokens)
         + embed(cfg.max_position_embeddings, "position", (None, "embed"))(positions)
         + embed(cfg.type_vocab_size, "token_type", (None, "embed"))(token_types))
    x = LayerNorm(cfg, name="ln_embed")(x)
    x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    length = x.shape[1]
    x, segment_ids = layers.ExtendInputs(name="extend_inputs")(x, segment_ids)
    stack = layers.block_stack(Layer, cfg, cfg.num_hidden_layers, name="layer", remat=cfg.remat,
                               scan=cfg.scan_layers)
    x = layers.run_blocks(stack, x, segment_ids, deterministic)
    x = x[:, x.shape[1] - length:]  # drop what ExtendInputs prepended
    if not self.add_pooling_layer:
      return x, None
    first = (x[:, 0] if pool_positions is None
             else jnp.take_along_axis(x, pool_positions[..., None], axis=1))
    pooled = jnp.tanh(dense(cfg, cfg.hidden_size, "pooler", ("embed", None))(first))
    return x, pooled
