"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021).

Both use the backbones' extension points (jaxft/models/layers.py), never their code:
- prefix: every attention layer's `ExtendKeys` gets P learned key and value vectors per KV head
  (jaxft/models/attention.py; with GQA the query heads of a group share them), seen by every
  query (padding and causality do not hide them). They are added after the KV cache, so
  generation with a cache conditions every step on them (the cache never holds them).
  With config.peft.prefix_projection = h > 0 each layer's prefix is an MLP (D -> h -> 2 D,
  tanh) of a learned [P, D] embedding, the reparameterisation the paper trains with; the MLP is
  what gets trained and saved.
- prompt: `ExtendInputs` prepends P learned input vectors after the embeddings; they pass
  through every layer like tokens (without a position embedding: they are learned whole) and
  the backbone drops their outputs, so heads see only the real positions. They join the first
  segment of each row. In decoding (jaxft.generate) the prompt goes in with the prefill call
  (more than one token) and stays in the KV cache for the one-token steps after it.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxft.models import layers
from jaxft.peft.base import Method, peft_variable


def _virtual_tokens(cfg) -> int:
  p = int(cfg.num_virtual_tokens)
  if p < 1:
    raise ValueError(f"config.peft.num_virtual_tokens={p} must be >= 1")
  return p


class Prefix(Method):
  name = "prefix"
  default_targets = r"extend_keys$"
  default_lr = 5e-3

  def intercept(self, f, args, kwargs, context, *, deterministic: bool):
    out = f(*args, **kwargs)
    if not self.targets_call(context, layers.ExtendKeys):
      return out
    module, (k, v, mask) = context.module, out
    b, _, h, dh = k.shape  # h: KV heads
    pk, pv = self._prefix(module, h, dh)  # [P, H, Dh] each
    p = pk.shape[0]
    k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), (b, p, h, dh)), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), (b, p, h, dh)), v], axis=1)
    mask = jnp.concatenate([jnp.ones((*mask.shape[:2], p), bool), mask], axis=2)
    return k, v, mask

  def _prefix(self, module, h: int, dh: int):
    p = _virtual_tokens(self.cfg)
    hidden = int(self.cfg.prefix_projection)
    if hidden <= 0:
      init = nn.initializers.normal(0.02)
      names = (None, "heads", "kv")
      return (peft_variable(module, "prefix_key", init, (p, h, dh), names),
              peft_variable(module, "prefix_value", init, (p, h, dh), names))
    d = h * dh
    emb = peft_variable(module, "prefix_embedding", nn.initializers.normal(0.02), (p, d),
                        (None, "embed"))
    w1 = peft_variable(module, "prefix_mlp_in", nn.initializers.lecun_normal(), (d, hidden),
                       ("embed", None))
    b1 = peft_variable(module, "prefix_mlp_in_bias", nn.initializers.zeros, (hidden,), (None,))
    w2 = peft_variable(module, "prefix_mlp_out", nn.initializers.normal(0.02), (hidden, 2 * d),
                       (None, None))
    b2 = peft_variable(module, "prefix_mlp_out_bias", nn.initializers.zeros, (2 * d,), (None,))
    kv = jnp.tanh(emb @ w1 + b1) @ w2 + b2  # [P, 2 D]
    return kv[:, :d].reshape(p, h, dh), kv[:, d:].reshape(p, h, dh)

  def describe(self) -> str:
    proj = int(self.cfg.prefix_projection)
    return (f"prefix {self.cfg.num_virtual_tokens} virtual tokens per layer"
            + (f" (MLP reparameterisation, hidden {proj})" if proj > 0 else ""))


class Prompt(Method):
  name = "prompt"
  default_targets = r"extend_inputs$"
  default_lr = 3e-2

  def intercept(self, f, args, kwargs, context, *, deterministic: bool):
    out = f(*args, **kwargs)
    if not self.targets_call(context, layers.ExtendInputs):
      return out
    module, (x, segment_ids) = context.module, out
    decode = args[2] if len(args) > 2 else kwargs.get("decode", False)
    if decode and x.shape[1] == 1:  # a decoding step: the prompt is in the cache already
      return out
    p = _virtual_tokens(self.cfg)
    # Scaled like the embeddings it is prepended to (at init: the dummy batch's).
    scale = jnp.maximum(jnp.std(x.astype(jnp.float32)), 1e-3)
    init = lambda key, shape, dtype: scale * jax.random.normal(key, shape, dtype)  # noqa: E731
    prompt = peft_variable(module, "prompt", init, (p, x.shape[-1]), (None, "embed"))
    b = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (b, p, x.shape[-1])), x], 1)
    first = jnp.maximum(segment_ids[:, :1], 1)  # left padding (segment 0) -> segment 1
    segment_ids = jnp.concatenate([jnp.broadcast_to(first, (b, p)), segment_ids], axis=1)
    return x, segment_ids

  def describe(self) -> str:
    return f"prompt {self.cfg.num_virtual_tokens} virtual tokens"
