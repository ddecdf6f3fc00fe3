"""The Llama-style decoder family in flax.linen: Llama 2/3, Mistral, Qwen 2/3, Gemma 2/3.

One module, configured from a transformers config.json (jaxft/hf/decoder_config.py) to be
architecturally identical to LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM:

    x = embed(tokens) [· sqrt(d), Gemma]
    per layer:  x += [post_norm](attention(norm(x)))   attention: q/k/v [+ bias, Qwen 2] ->
                x += [post_norm](mlp(norm(x)))         [q/k RMSNorm per head, Qwen 3 / Gemma 3]
                                                       -> rotary -> GQA softmax [softcap,
                                                       sliding window] -> out
    mlp = down(act(gate(x)) * up(x))                   act: SiLU (Llama) or tanh GELU (Gemma)
    logits = [softcap](norm(x) @ lm_head)              lm_head tied to embed or its own

RMSNorm is w·x̂ (Llama) or (1 + w)·x̂ (Gemma). Layers alternate sliding-window and global
attention where `layer_types` says so (Gemma 2: every other; Gemma 3: five local, one global,
the local ones with their own rotary base); Mistral slides in every layer. Module names follow
the GPT-2 and BERT families (attn/query|key|value|out, mlp/gate|up|down) so PEFT targets read
the same everywhere; jaxft/hf/tables.py maps them to transformers' q_proj, gate_proj, ...
Attention itself (masks from segment ids, the KV cache of KV heads, kernels) is
jaxft/models/attention.py.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxft.models import attention, flops, layers
from jaxft.models import rope as rotary
from jaxft.parallel import sharding

Dtype = Any
SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 0  # 0 = num_attention_heads (multi-head attention)
  head_dim: int = 0  # 0 = hidden_size // num_attention_heads
  max_position_embeddings: int = 2048  # the context: prompts + generations fit in it
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"  # ACTIVATIONS
  # Rotary embeddings (jaxft/models/rope.py); rope_local_theta > 0 gives sliding layers their
  # own unscaled base (Gemma 3's rope_local_base_freq).
  rope_theta: float = 10_000.0
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  rope_local_theta: float = 0.0
  attention_bias: bool = False  # biases on q, k, v (Qwen 2; Llama's attention_bias)
  attention_out_bias: bool = False  # a bias on the output projection (Llama's attention_bias)
  mlp_bias: bool = False
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before rotary (Qwen 3, Gemma 3)
  norm_plus_one: bool = False  # Gemma: RMSNorm weights scale by (1 + w)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  post_norms: bool = False  # Gemma 2/3: norms after attention and MLP as well as before
  query_pre_attn_scalar: float = 0.0  # > 0: attention scale 1/sqrt(it) (Gemma); 0: head_dim
  attn_logit_softcapping: float = 0.0  # > 0: scores -> c·tanh(scores / c) (Gemma 2)
  final_logit_softcapping: float = 0.0  # the same on the LM logits (Gemma 2)
  sliding_window: int = 0  # keys a sliding layer's query sees (itself included); 0 = none
  layer_types: tuple = ()  # per layer SLIDING | FULL; () = every layer slides if sliding_window
  attention_dropout: float = 0.0
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  model_type: str = "llama"  # the transformers model_type export writes (llama, qwen2, ...)
  dtype: Dtype = jnp.float32  # compute dtype of matmuls; params stay in param_dtype
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # layers.REMAT_POLICIES
  scan_layers: bool = False
  attention_impl: str = "xla"  # attention.IMPLEMENTATIONS

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  context_field = "max_position_embeddings"  # the context's config.model field (in messages)

  @property
  def context_length(self) -> int:
    return self.max_position_embeddings

  @property
  def lm_head_path(self) -> str:
    """The causal LM head's parameter path (PEFT decides from it whether the head trains)."""
    return "model/embed/embedding" if self.tie_word_embeddings else "lm_head/embedding"

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    if not self.sliding_window:
      return (False,) * self.num_hidden_layers
    if not self.layer_types:
      return (True,) * self.num_hidden_layers
    return tuple(t == SLIDING for t in self.layer_types)

  @property
  def rope(self) -> rotary.Rope:
    return rotary.Rope(self.rope_theta, self.rope_type, self.rope_factor, self.rope_low_freq_factor,
                     self.rope_high_freq_factor, self.rope_original_max_positions)

  @property
  def local_rope(self) -> rotary.Rope | None:
    return rotary.Rope(self.rope_local_theta) if self.rope_local_theta else None

  @property
  def attention_spec(self) -> attention.Spec:
    scale = self.query_pre_attn_scalar ** -0.5 if self.query_pre_attn_scalar else None
    return attention.Spec(self.attention_impl, causal=True, dropout_rate=self.attention_dropout,
                          dropout_field="config.model.attention_dropout", scale=scale,
                          dtype=self.dtype, softcap=self.attn_logit_softcapping)

  @property
  def flops_backbone(self) -> flops.Backbone:
    d, w, kv = self.hidden_size, self.num_attention_heads * self.dim_per_head, self.kv_heads
    per_layer = 2 * d * w + 2 * d * kv * self.dim_per_head + 3 * d * self.intermediate_size
    return flops.Backbone(self.num_hidden_layers, d, w, per_layer, causal=True)

  def validate(self) -> None:
    """Errors naming the config.model field, for shapes the modules cannot build."""
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"config.model.num_key_value_heads={self.kv_heads} must divide "
                       f"config.model.num_attention_heads={self.num_attention_heads}")
    if not self.head_dim and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"config.model.hidden_size={self.hidden_size} must be divisible by "
                       f"config.model.num_attention_heads={self.num_attention_heads} (or set "
                       "config.model.head_dim)")
    if self.dim_per_head % 2:
      raise ValueError(f"head dim {self.dim_per_head} must be even for rotary embeddings")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"config.model.hidden_act={self.hidden_act!r} is unknown; use one of "
                       f"{list(ACTIVATIONS)}")
    if self.rope_type not in rotary.TYPES:
      raise ValueError(f"config.model.rope_type={self.rope_type!r} is unknown; use one of "
                       f"{rotary.TYPES}")
    if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(f"config.model.layer_types has {len(self.layer_types)} entries for "
                       f"num_hidden_layers={self.num_hidden_layers}")
    bad = sorted(set(self.layer_types) - {SLIDING, FULL})
    if bad:
      raise ValueError(f"config.model.layer_types has {bad}; use {SLIDING!r} or {FULL!r}")


def _init(cfg: LlamaConfig, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), axes)


def _norm(cfg: LlamaConfig, name: str, axis_name: str = "embed"):
  return layers.RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, cfg.dtype, cfg.param_dtype,
                        axis_name, name=name)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, segment_ids, cos, sin, window, *, deterministic: bool, decode: bool):
    cfg = self.cfg
    h = cfg.dim_per_head

    def proj(heads, name, bias):
      return nn.DenseGeneral((heads, h), use_bias=bias, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, name=name,
                             kernel_init=_init(cfg, ("embed", "heads", "kv")),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    ("heads", "kv")))

    q = proj(cfg.num_attention_heads, "query", cfg.attention_bias)(x)  # [B, T, N, H]
    k = proj(cfg.kv_heads, "key", cfg.attention_bias)(x)  # [B, T, K, H]
    v = proj(cfg.kv_heads, "value", cfg.attention_bias)(x)
    if cfg.qk_norm:
      q = _norm(cfg, "query_norm", "kv")(q)
      k = _norm(cfg, "key_norm", "kv")(k)
    q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
    q = sharding.constrain(q, ("batch", "length", "act_heads", "kv"))
    out = attention.attend(self, q, k, v, segment_ids, cfg.attention_spec,
                           deterministic=deterministic, decode=decode, window=window)
    return nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_out_bias,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out",
                           kernel_init=_init(cfg, ("heads", "kv", "embed")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("embed",)))(out)


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg

    def dense(features, name, axes):
      return nn.Dense(features, use_bias=cfg.mlp_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name=name, kernel_init=_init(cfg, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

    gate = dense(cfg.intermediate_size, "gate", ("embed", "mlp"))(x)
    up = dense(cfg.intermediate_size, "up", ("embed", "mlp"))(x)
    h = sharding.constrain(ACTIVATIONS[cfg.hidden_act](gate) * up, ("batch", "length", "act_mlp"))
    return dense(cfg.hidden_size, "down", ("mlp", "embed"))(h)


def _layer_choice(cfg: LlamaConfig, layer, tables):
  """(window, cos, sin) of layer `layer` (a Python int, or traced under nn.scan / nn.remat)."""
  sliding = cfg.sliding_layers
  (g_cos, g_sin), local = tables["global"], tables.get("local")
  if len(set(sliding)) == 1 or isinstance(layer, int):  # known while tracing
    is_sliding = sliding[0] if len(set(sliding)) == 1 else sliding[layer]
    cos, sin = local if (is_sliding and local is not None) else (g_cos, g_sin)
    return (cfg.sliding_window if is_sliding else None), cos, sin
  flag = jnp.asarray(sliding)[layer]
  # A global layer's window: longer than any row, so the window test always passes.
  window = jnp.where(flag, cfg.sliding_window, jnp.iinfo(jnp.int32).max // 2)
  if local is None:
    return window, g_cos, g_sin
  return window, jnp.where(flag, local[0], g_cos), jnp.where(flag, local[1], g_sin)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  # layers.block_stack's signature; the carry holds the layer index, which picks a layer's
  # window and rotary table when layers differ (traced under nn.scan).
  def __call__(self, carry, aux, deterministic: bool, decode: bool):
    cfg = self.cfg
    x, layer = carry
    segment_ids, tables = aux
    window, cos, sin = _layer_choice(cfg, layer, tables)
    h = Attention(cfg, name="attn")(_norm(cfg, "ln_attn")(x), segment_ids, cos, sin, window,
                                    deterministic=deterministic, decode=decode)
    if cfg.post_norms:
      h = _norm(cfg, "ln_attn_out")(h)
    x = x + h
    h = MLP(cfg, name="mlp")(_norm(cfg, "ln_mlp")(x))
    if cfg.post_norms:
      h = _norm(cfg, "ln_mlp_out")(h)
    x = sharding.constrain(x + h, ("batch", "length", "act_embed"))
    return (x, layer + 1), None


class LlamaModel(nn.Module):
  """The backbone: token ids -> final hidden states [B, T, D] (after the final norm)."""

  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    cfg.validate()
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype,
                          embedding_init=_init(cfg, ("vocab", "embed")))
    self.layers = layers.block_stack(Block, cfg, cfg.num_hidden_layers, name="layers",
                                     remat=cfg.remat, scan=cfg.scan_layers)
    self.norm = _norm(cfg, "norm")
    self.extend_inputs = layers.ExtendInputs()

  def __call__(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
               decode: bool = False):
    cfg = self.cfg
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = self.embed(tokens)
    if cfg.embed_scale:  # in the compute dtype, as transformers' Gemma rounds it
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    length = x.shape[1]
    x, segment_ids = self.extend_inputs(x, segment_ids, decode)
    prefix = x.shape[1] - length
    if prefix:  # PEFT prompt vectors sit just before the text, in rotary distance too
      before = positions[:, :1] - prefix + jnp.arange(prefix)[None]
      positions = jnp.concatenate([before, positions], axis=1)
    tables = {"global": cfg.rope.tables(positions, cfg.dim_per_head)}
    if cfg.local_rope is not None:
      tables["local"] = cfg.local_rope.tables(positions, cfg.dim_per_head)
    first = jnp.zeros((), jnp.int32) if cfg.scan_layers else 0
    x, _ = layers.run_blocks(self.layers, (x, first), (segment_ids, tables), deterministic,
                             decode)
    return self.norm(x[:, prefix:])


class LlamaForCausalLM(nn.Module):
  """Backbone + LM head (tied to the embedding, or its own [V, D] table). `__call__` returns
  logits; `hidden` skips the head; `embedding` is the head's [V, D] for the fused loss."""

  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    self.model = LlamaModel(cfg)
    if not cfg.tie_word_embeddings:  # [V, D] like the embedding: HF's lm_head.weight as it is
      self.lm_head = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              embedding_init=_init(cfg, ("vocab", "embed")))

  def __call__(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
               decode: bool = False):
    return self.logits(self.hidden(tokens, positions, segment_ids, deterministic=deterministic,
                                   decode=decode))

  def hidden(self, tokens, positions, segment_ids=None, *, deterministic: bool = True,
             decode: bool = False):
    return self.model(tokens, positions, segment_ids, deterministic=deterministic, decode=decode)

  def logits(self, hidden):
    head = self.model.embed if self.cfg.tie_word_embeddings else self.lm_head
    logits = head.attend(hidden)
    cap = self.cfg.final_logit_softcapping
    if cap:
      logits = jnp.tanh(logits.astype(jnp.float32) / cap) * cap
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))

  def embedding(self):
    head = self.model.embed if self.cfg.tie_word_embeddings else self.lm_head
    return head.embedding
