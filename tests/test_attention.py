"""jaxft/models/attention.py: every implementation that runs on CPU agrees with xla (values and
gradients), GQA against repeated KV heads, the KV cache against a full causal pass, the PEFT
prefix hook, the errors a user can cause, and splash compiled for a TPU slice."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

from jaxft.models import attention
from jaxft.models.registry import build_model
from jaxft.parallel import sharding
from tests.helpers import tiny_config, train_config


def _normal(seed, *shape):
  # numpy draws: eager jax.random would compile a program per shape (seconds on 2 cores)
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _qkv(b, t, n, k, h, seed=0):
  return _normal(seed, b, t, n, h), _normal(seed + 100, b, t, k, h), _normal(seed + 200, b, t, k, h)


def _packed(b, t, padding: bool):
  """Three packed segments per row (different cuts per row), optionally right padding."""
  rows = []
  for i in range(b):
    cuts = (t // 3 + 7 * i, 2 * t // 3 + 3 * i)
    row = 1 + (np.arange(t) >= cuts[0]) + (np.arange(t) >= cuts[1])
    if padding:
      row[t - 5 - 4 * i:] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


def _values_and_grads(fn, q, k, v, segment_ids):
  """fn's output and the gradients of a random projection of its real (non-padding) rows."""
  cot = _normal(9, *q.shape) * (segment_ids > 0)[:, :, None, None]
  out, vjp = jax.vjp(fn, q, k, v)
  return out * (segment_ids > 0)[:, :, None, None], vjp(cot)


def _reference(mask):
  return jax.jit(lambda *a: attention.reference_attention(*a, mask))


def _assert_close(got, want, atol=1e-5):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_groups_query_heads_like_repeated_kv(n, k, causal):
  q, kk, v = _qkv(2, 12, n, k, 8)
  seg = _packed(2, 12, padding=not causal)
  mask = attention.segment_mask(seg, causal=causal)
  got = _values_and_grads(jax.jit(lambda *a: attention.xla_attention(*a, mask)), q, kk, v, seg)
  want = _values_and_grads(_reference(mask), q, kk, v, seg)
  _assert_close(got, want)
  assert got[1][1].shape == kk.shape  # gradients land on the K KV heads


def test_masks_keep_segments_apart_and_padding_unseen():
  seg = jnp.asarray([[1, 1, 2, 2, 0]])
  causal = np.asarray(attention.segment_mask(seg, causal=True)[0])
  both = np.asarray(attention.segment_mask(seg, causal=False)[0])
  assert causal[3].tolist() == [False, False, True, True, False]
  assert both[0].tolist() == [True, True, False, False, False]
  assert not both[:4, 4].any() and not causal[:4, 4].any()  # no real token sees padding


@pytest.mark.parametrize("causal,n,k", [(True, 4, 2), (False, 2, 2)])
def test_splash_in_interpret_mode_matches_xla(causal, n, k):
  """The Pallas kernel run by the CPU interpreter; 100 tokens are padded to the 128-token
  block inside splash_attention."""
  b, t, h = 2, 100, 16
  q, kk, v = _qkv(b, t, n, k, h, seed=1)
  seg = _packed(b, t, padding=not causal)
  mask = attention.segment_mask(seg, causal=causal)
  splash = lambda *a: attention.splash_attention(*a, seg, causal=causal,  # noqa: E731
                                                 interpret=True)
  got = _values_and_grads(jax.jit(splash), q, kk, v, seg)
  want = _values_and_grads(_reference(mask), q, kk, v, seg)
  _assert_close(got, want)


def test_splash_under_a_mesh_shards_batch_and_heads(monkeypatch):
  """Inside a sharded step the kernel runs per device (shard_map): batch over data, heads over
  tensor (each device holds 2 query heads and their 1 KV head)."""
  monkeypatch.setenv(attention.INTERPRET_ENV, "1")
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 2), sharding.MESH_AXES)
  rules = tiny_config().axis_rules
  q, k, v = _qkv(2, 128, 4, 2, 16, seed=2)
  seg = _packed(2, 128, padding=False)
  fn = sharding.constrained(
      lambda q, k, v: attention.splash_attention(q, k, v, seg, causal=True), mesh, rules)
  got = jax.jit(fn)(q, k, v)
  want = attention.reference_attention(q, k, v, attention.segment_mask(seg, causal=True))
  _assert_close(got, want)


class _Core(nn.Module):
  """Only the shared attention (q/k/v given), as a family calls it."""

  spec: attention.Spec

  @nn.compact
  def __call__(self, q, k, v, segment_ids, decode: bool = False, deterministic: bool = True):
    return attention.attend(self, q, k, v, segment_ids, self.spec, deterministic=deterministic,
                            decode=decode)


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2)])
def test_kv_cache_prefill_and_decode_equal_the_full_causal_pass(n, k):
  b, t, h = 2, 8, 8
  q, kk, v = _qkv(b, t, n, k, h, seed=3)
  seg = jnp.ones((b, t), jnp.int32).at[1, :2].set(0)  # row 1: a left-padded prompt
  core = _Core(attention.Spec())
  full = core.apply({}, q, kk, v, seg)
  cache = core.init(jax.random.key(0), q, kk, v, seg, decode=True)["cache"]
  assert cache["cached_key"].shape == (b, t, k, h)  # KV heads only, never repeated
  decoded, cache = _decode(core, cache, 5, q, kk, v, seg)
  real = (seg > 0)[:, :, None, None]
  _assert_close(decoded * real, full * real)
  assert int(cache["index"]) == t


def _decode(core, cache, prefill: int, *qkv_seg):
  """A prefill call over the first `prefill` positions, then one call per position."""
  step = jax.jit(lambda cache, *a: core.apply({"cache": cache}, *a, decode=True,
                                              mutable=["cache"]))
  out, mutated = step(cache, *(x[:, :prefill] for x in qkv_seg))
  steps = [out]
  for i in range(prefill, qkv_seg[0].shape[1]):
    out, mutated = step(mutated["cache"], *(x[:, i:i + 1] for x in qkv_seg))
    steps.append(out)
  return jnp.concatenate(steps, axis=1), mutated["cache"]


def _with_prefix(pk, pv):
  """An interceptor prepending fixed keys/values [P, K, H] at ExtendKeys, as PEFT prefix does."""
  def intercept(f, args, kwargs, context):
    if context.method_name != "__call__" or context.module.name != "extend_keys":
      return f(*args, **kwargs)
    k, v, mask = f(*args, **kwargs)
    b, p = k.shape[0], pk.shape[0]
    k = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)), v], axis=1)
    return k, v, jnp.concatenate([jnp.ones((*mask.shape[:2], p), bool), mask], axis=2)
  return nn.intercept_methods(intercept)


def test_a_prefix_through_extend_keys_is_seen_by_every_query_and_never_cached():
  b, t, n, k, h, p = 2, 6, 4, 2, 8, 3
  q, kk, v = _qkv(b, t, n, k, h, seed=4)
  pk, pv = _normal(5, p, k, h), _normal(6, p, k, h)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
  core = _Core(attention.Spec())
  with _with_prefix(pk, pv):
    full = core.apply({}, q, kk, v, seg)
    cache = core.init(jax.random.key(0), q, kk, v, seg, decode=True)["cache"]
    decoded, cache = _decode(core, cache, 4, q, kk, v, seg)
  # reference: prefix keys first, visible to all; then each query's own segment, causally
  mask = jnp.concatenate([jnp.ones((b, t, p), bool), attention.segment_mask(seg, causal=True)],
                         axis=2)
  ext = lambda x, px: jnp.concatenate([jnp.broadcast_to(px, (b, *px.shape)), x], axis=1)  # noqa
  want = attention.reference_attention(q, ext(kk, pk), ext(v, pv), mask)
  _assert_close(full, want)
  _assert_close(decoded[1], full[1])  # row 1: one segment, as decoding sees it
  assert cache["cached_key"].shape == (b, t, k, h)  # the prefix is not in it
  with _with_prefix(pk, pv), pytest.raises(ValueError, match=r"attention_impl='splash' cannot "
                                           r"attend to a PEFT prefix"):
    _Core(attention.Spec("splash")).apply({}, q, kk, v, seg)


def test_the_gpt2_model_with_splash_matches_xla(monkeypatch):
  """The whole causal LM through `attend` (Pallas interpret mode stands in for the TPU)."""
  monkeypatch.setenv(attention.INTERPRET_ENV, "1")
  config = tiny_config(n_layer=1, n_head=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 24)))
  seg = _packed(2, 24, padding=False)
  pos = jnp.broadcast_to(jnp.arange(24), tokens.shape)
  model, _ = build_model(config.model)
  params = nn.unbox(model.init(jax.random.key(1), tokens, pos, seg))
  config.model.attention_impl = "splash"
  splash_model, _ = build_model(config.model)
  _assert_close(jax.jit(splash_model.apply)(params, tokens, pos, seg),
                jax.jit(model.apply)(params, tokens, pos, seg), atol=2e-5)


def test_errors_name_the_field_and_the_fix(monkeypatch):
  q, k, v = _qkv(1, 8, 2, 2, 8)
  seg = jnp.ones((1, 8), jnp.int32)
  config = tiny_config(attention_impl="flash")
  with pytest.raises(ValueError, match=r"config.model.attention_impl='flash' is unknown; use "
                     r"one of xla"):
    build_model(config.model)
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs an NVIDIA GPU.*set "
                     r"config.model.attention_impl='xla'"):
    _Core(attention.Spec("cudnn")).apply({}, q, k, v, seg)
  with pytest.raises(ValueError, match=r"attention_impl='splash' needs a TPU"):
    _Core(attention.Spec("splash")).apply({}, q, k, v, seg)
  spec = attention.Spec("splash", dropout_rate=0.1, dropout_field="config.model.attn_pdrop")
  with pytest.raises(ValueError, match=r"no attention-probability dropout .*set "
                     r"config.model.attn_pdrop=0 or config.model.attention_impl='xla'"):
    _Core(spec).apply({}, q, k, v, seg, deterministic=False, rngs={"dropout": jax.random.key(0)})
  monkeypatch.setenv(attention.INTERPRET_ENV, "1")
  cache = _Core(attention.Spec()).init(jax.random.key(0), q, k, v, seg, decode=True)["cache"]
  with pytest.raises(ValueError, match=r"'splash' cannot decode with a KV cache"):
    _Core(attention.Spec("splash")).apply({"cache": cache}, q, k, v, seg, decode=True,
                                          mutable=["cache"])
  monkeypatch.setattr(attention, "_platform", lambda: "gpu")  # past the device check
  with pytest.raises(ValueError, match=r"'cudnn' needs bfloat16 or float16 activations, not "
                     r"float32; set config.model.dtype='bfloat16'"):
    _Core(attention.Spec("cudnn")).apply({}, q, k, v, seg)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU slice needs `pip install libtpu` (not in CI)")
def test_splash_compiles_for_a_tpu_slice(tmp_path):
  from jaxft import train

  config = train_config(tmp_path, num_steps=10)
  config.model.update(attention_impl="splash", attn_pdrop=0.0)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  assert train.compile_only(config, topology="v5e-8")["temp"] > 0
