"""One attention for every model family (GPT-2, BERT, and the Llama-style families with GQA).

A family projects q [B, Tq, N, H] and k, v [B, Tk, K, H] (K KV heads dividing N query heads:
K = N is multi-head, K = 1 multi-query, else grouped-query attention) and calls `attend`, which
owns everything between the projections and the output projection:
- the mask, from segment ids: a query sees keys of its own segment only (packed documents
  never see each other); causal or bidirectional; segment 0 is padding, never seen by a real
  token (what padding queries compute is meaningless and must be ignored by losses);
- the KV cache for decoding ("cache" collection: cached_key / cached_value [B, S, K, H] hold
  KV heads only, never query-repeated ones; valid [B, S]; index);
- the PEFT hook `layers.ExtendKeys` (prefix tuning), after the cache so a prefix is never
  written into it;
- dropout on the probabilities with jaxft's Dropout (same masks as before this module);
- the kernel, `config.model.attention_impl` (IMPLEMENTATIONS).

`attend` runs inside the family's attention module (it takes that module): the cache
variables, `extend_keys` and the Dropout are created in its scope, so checkpoints, PEFT
prefixes and dropout random streams keep the paths they had when each family wrote its own.
"""

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from jaxft.models import layers
from jaxft.models.dropout import Dropout
from jaxft.parallel import sharding

FIELD = "config.model.attention_impl"
IMPLEMENTATIONS = {
    "xla": "einsum + float32 softmax, any backend (materialises [B, N, Tq, Tk])",
    "cudnn": "cuDNN flash attention via jax.nn.dot_product_attention (NVIDIA GPU, bf16/fp16)",
    "splash": "Pallas splash-attention kernel (TPU)",
}
# Tests only: runs the splash kernel in Pallas interpret mode, so it runs (slowly) on CPU.
INTERPRET_ENV = "JAXFT_SPLASH_INTERPRET"


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a family tells `attend` (built from its config dataclass)."""

  impl: str = "xla"  # IMPLEMENTATIONS
  causal: bool = True
  dropout_rate: float = 0.0  # on the attention probabilities, in training
  dropout_field: str = "the attention dropout"  # its config field, named in errors
  scale: float | None = None  # on q.k; None = 1 / sqrt(head_dim)
  dtype: Any = jnp.float32  # dtype of the probabilities in the probs x values matmul (xla)
  softcap: float = 0.0  # > 0: scores -> softcap * tanh(scores / softcap) (Gemma 2)


def check_impl(impl: str) -> None:
  if impl not in IMPLEMENTATIONS:
    options = "; ".join(f"{k}: {v}" for k, v in IMPLEMENTATIONS.items())
    raise ValueError(f"{FIELD}={impl!r} is unknown; use one of {options}")


def _refuse(impl: str, why: str, fix: str) -> ValueError:
  return ValueError(f"{FIELD}={impl!r} {why}; {fix} (attention_impl only changes how "
                    "attention is computed: a checkpoint trained with one runs with another)")


def segment_mask(segment_ids, *, causal: bool, window=None):
  """segment_ids [B, T] -> mask [B, Tq, Tk]: same segment (and key <= query if causal; and
  key > query - window with a sliding `window`, a Python or traced int).

  Bidirectionally padding keys are also hidden from padding queries (HF BERT's key mask);
  causally padding attends to padding, so that no row is empty."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    t = segment_ids.shape[1]
    return _causal(jnp.arange(t), jnp.arange(t), window)[None] & same
  return same & (segment_ids[:, None, :] > 0)


def _causal(query_slot, key_slot, window):
  """[Tq, Tk]: the keys each query sees (a segment's slots are consecutive, so slot distance is
  position distance, in packed rows and in the left-padded cache alike)."""
  seen = key_slot[None, :] <= query_slot[:, None]
  if window is not None:  # transformers' sliding_window_overlay: q - k < window
    seen &= key_slot[None, :] > query_slot[:, None] - window
  return seen


def update_cache(module: nn.Module, k, v, segment_ids, window=None):
  """Writes this call's keys/values [B, T, K, H] at the cache cursor of `module`'s "cache"
  collection; returns (all cached k, v [B, S, K, H], mask [B, T, S]).

  The cache is sized at init time (the length of the dummy input given to `model.init` with
  decode=True). Padding tokens (segment id 0, e.g. left-padded prompts) are marked invalid so
  that no later query attends to them. The same call serves prefill (T > 1) and decoding."""
  b, t, kh, h = k.shape
  is_init = not module.has_variable("cache", "cached_key")
  cached_k = module.variable("cache", "cached_key", jnp.zeros, (b, t, kh, h), k.dtype)
  cached_v = module.variable("cache", "cached_value", jnp.zeros, (b, t, kh, h), v.dtype)
  valid = module.variable("cache", "valid", jnp.zeros, (b, t), bool)
  index = module.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
  if is_init:
    key_valid, query_slot, key_slot = segment_ids != 0, jnp.arange(t), jnp.arange(t)
  else:
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
    valid.value = jax.lax.dynamic_update_slice(valid.value, segment_ids != 0, (0, i))
    index.value = i + t
    k, v, key_valid = cached_k.value, cached_v.value, valid.value
    query_slot, key_slot = i + jnp.arange(t), jnp.arange(cached_k.value.shape[1])
  mask = _causal(query_slot, key_slot, window)[None] & key_valid[:, None, :]
  return k, v, mask


def attend(module: nn.Module, q, k, v, segment_ids, spec: Spec, *, deterministic: bool,
           decode: bool = False, window=None):
  """q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T] -> [B, T, N, H] in q's dtype.

  Call it from `module`'s compact __call__, between the q/k/v and output projections. With
  decode=True (causal only) the keys/values go through `module`'s KV cache first. `window`
  (causal only; a Python int, or traced where scanned layers alternate sliding and global
  attention): a query sees the `window` latest keys, itself included (Mistral, Gemma)."""
  check_impl(spec.impl)
  n, kh = q.shape[2], k.shape[2]
  if n % kh:
    raise ValueError(f"{n} query heads cannot share {kh} KV heads: K must divide N")
  if decode:
    if not spec.causal:
      raise ValueError("a KV cache (decode=True) needs causal attention")
    k, v, mask = update_cache(module, k, v, segment_ids, window)
  else:
    mask = segment_mask(segment_ids, causal=spec.causal, window=window)  # [B, Tq, Tk]
  t_k = k.shape[1]
  k, v, mask = layers.ExtendKeys(name="extend_keys")(k, v, mask)
  prefixed = k.shape[1] != t_k
  # Created whatever the kernel, so that the family's later Dropouts keep their names (and
  # thus their random streams) across implementations.
  dropout = Dropout(spec.dropout_rate)
  # Initialising only needs shapes (no parameter depends on attention values): xla traces on
  # any host, e.g. the abstract init of a TPU or GPU run's state on its CPU.
  if spec.impl == "xla" or module.is_initializing():
    drop = lambda p: dropout(p, deterministic=deterministic)  # noqa: E731
    return xla_attention(q, k, v, mask, scale=spec.scale, dropout=drop, dtype=spec.dtype,
                         softcap=spec.softcap)
  if spec.softcap:
    raise _refuse(spec.impl, "has no attention-logit soft-capping (Gemma 2)",
                  f"set {FIELD}='xla'")
  if spec.dropout_rate > 0 and not deterministic:
    raise _refuse(spec.impl, f"has no attention-probability dropout ({spec.dropout_field}="
                  f"{spec.dropout_rate} in training)",
                  f"set {spec.dropout_field}=0 or {FIELD}='xla'")
  if spec.impl == "cudnn":
    # cuDNN skips the blocks above the diagonal only for square, top-left aligned masks.
    causal = spec.causal and not decode and not prefixed
    return cudnn_attention(q, k, v, mask, causal=causal, scale=spec.scale)
  if decode:
    raise _refuse("splash", "cannot decode with a KV cache (generation)",
                  f"set {FIELD}='xla' (or 'cudnn' on a GPU) for generation")
  if window is not None:
    raise _refuse("splash", "has no sliding-window attention here (Mistral, Gemma)",
                  f"set {FIELD}='xla'")
  if prefixed:
    raise _refuse("splash", "cannot attend to a PEFT prefix (config.peft.method='prefix')",
                  f"set {FIELD}='xla' or use another PEFT method")
  return splash_attention(q, k, v, segment_ids, causal=spec.causal, scale=spec.scale)


# -- xla ---------------------------------------------------------------------------------------

def xla_attention(q, k, v, mask, *, scale=None, dropout=None, dtype=None, softcap=0.0):
  """q [B, Tq, N, H], k/v [B, Tk, K, H], mask [B, Tq, Tk] -> [B, Tq, N, H].

  Scores and softmax in float32; `dropout` maps probabilities [B, N, Tq, Tk] to dropped ones;
  they are cast to `dtype` (default v's) for the matmul with the values."""
  b, tq, n, h = q.shape
  tk, kh = k.shape[1], k.shape[2]
  g = n // kh
  # GQA groups query heads per KV head ([B, Tq, K, G, H]) rather than repeating KV; K = N keeps
  # the plain einsums (bit-identical to the code this replaced).
  if g == 1:
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  else:
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, tq, kh, g, h), k)
    scores = scores.reshape(b, n, tq, tk)
  scores = scores.astype(jnp.float32)
  scores = scores / jnp.sqrt(h) if scale is None else scores * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  probs = probs.astype(dtype or v.dtype)
  if g == 1:
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.reshape(b, kh, g, tq, tk), v)
  return out.reshape(b, tq, n, h)


def reference_attention(q, k, v, mask, *, scale=None):
  """GQA by repeating KV heads: what tests compare every implementation against."""
  g = q.shape[2] // k.shape[2]
  return xla_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), mask, scale=scale)


# -- cudnn -------------------------------------------------------------------------------------

def _platform() -> str:
  """The platform the traced step is compiled for: the mesh's (a TPU topology when compiling
  ahead of time from a CPU host), else the default backend."""
  active = sharding.active()  # the mesh of the enclosing sharding.constrained step
  if active is not None:
    return active[0].devices.flat[0].platform
  return jax.default_backend()


def cudnn_attention(q, k, v, mask, *, causal: bool, scale=None):
  """jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (GQA native).

  The mask goes in as a [B, 1, Tq, Tk] bias (packed segments, padding, prefixes, the cache);
  `causal` also lets cuDNN skip the blocks above the diagonal."""
  if _platform() != "gpu":
    raise _refuse("cudnn", f"needs an NVIDIA GPU, and this runs on {_platform()}",
                  f"set {FIELD}='xla' (or 'splash' on TPU)")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise _refuse("cudnn", f"needs bfloat16 or float16 activations, not {q.dtype}",
                  f"set config.model.dtype='bfloat16' or {FIELD}='xla'")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                        is_causal=causal, implementation="cudnn")
  except (NotImplementedError, RuntimeError) as e:  # cuDNN's shape / version limits
    raise _refuse("cudnn", f"cannot run this attention (q {q.shape}, k {k.shape}: {e})",
                  f"set {FIELD}='xla'") from e


# -- splash ------------------------------------------------------------------------------------

def _interpret() -> bool:
  return os.environ.get(INTERPRET_ENV, "") not in ("", "0")


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, heads: int, causal: bool, mqa: bool, interpret: bool):
  """The kernel for one example: q [heads, T, H] against k/v [T, H] (mqa) or [heads, T, H]."""
  one = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
  block = next(s for s in (512, 256, 128) if t % s == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  make = sk.make_splash_mqa if mqa else sk.make_splash_mha
  # Concrete mask tables even when first built inside a trace: the cache outlives the trace.
  with jax.ensure_compile_time_eval():
    return make(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, causal: bool, interpret: bool):
  """One device's share: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, H]
  ids = sk.SegmentIds(q=segment_ids, kv=segment_ids)
  if kh == n:
    out = jax.vmap(_splash_kernel(t, n, causal, False, interpret))(q, k, v, ids)
  else:  # one MQA kernel per KV head and its group of query heads
    kernel = _splash_kernel(t, n // kh, causal, True, interpret)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head)(q.reshape(b, kh, n // kh, t, h), k, v, ids)
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _fit(mesh, axes, *dims):
  """Mesh axes `axes` (a name, tuple or None) if their size divides every dim, else None."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  size = math.prod(mesh.shape[a] for a in names)
  return axes if names and all(d % size == 0 for d in dims) else None


def splash_attention(q, k, v, segment_ids, *, causal: bool, scale=None,
                     interpret: bool | None = None):
  """The TPU splash kernel: self-attention, q [B, T, N, H], k/v [B, T, K, H], segment_ids
  [B, T] -> [B, T, N, H]. Under a sharded step (sharding.constrained) it runs per device with
  shard_map: batch over the batch axes, heads over the head axes (where they divide).
  interpret=None reads INTERPRET_ENV (tests: Pallas interpret mode runs it on CPU)."""
  interpret = _interpret() if interpret is None else interpret
  if not interpret and _platform() != "tpu":
    raise _refuse("splash", f"needs a TPU, and this runs on {_platform()}",
                  f"set {FIELD}='xla' (or 'cudnn' on an NVIDIA GPU)")
  b, t, n, h = q.shape
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale
  pad = -t % 128  # the kernel's blocks are multiples of 128 tokens
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    # Segment -1 (no real token has it) keeps the padded rows apart and never empty.
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  local = functools.partial(_splash_local, causal=causal, interpret=interpret)
  active = sharding.active()
  if active is None:
    return local(q, k, v, segment_ids)[:, :t]
  mesh, rules = active
  batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_heads"), rules)
  batch_axes, head_axes = _fit(mesh, batch_axes, b), _fit(mesh, head_axes, n, k.shape[2])
  heads_spec = PartitionSpec(batch_axes, None, head_axes, None)
  out = jax.shard_map(local, mesh=mesh, check_vma=False,
                      in_specs=(heads_spec, heads_spec, heads_spec,
                                PartitionSpec(batch_axes, None)),
                      out_specs=heads_spec)(q, k, v, segment_ids)
  return out[:, :t]

