"""GPT-2 model properties that HF parity alone does not pin down."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import gpt2 as gpt2_configs
from jaxft import tasks
from jaxft.models.registry import build_model
from tests.helpers import random_batch, tiny_config


@pytest.mark.parametrize("variant,expected", [
    ("124m", 124_439_808), ("350m", 354_823_168), ("774m", 774_030_080),
    ("1.5b", 1_557_611_200)])
def test_published_gpt2_sizes(variant, expected):
  """Parameter counts of HF's gpt2, gpt2-medium, -large, -xl (tied head, 1024 positions)."""
  model, _ = build_model(gpt2_configs.get_config(variant).model)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == expected


def _init(config):
  model, _ = build_model(config.model)
  tokens = jnp.zeros((1, config.seq_len), jnp.int32)
  return model, nn.unbox(model.init(jax.random.key(1), tokens, tokens))["params"]


def test_causal_and_segment_isolation():
  config = tiny_config()
  model, params = _init(config)
  b = random_batch(config, batch_size=2)
  logits = model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
  cut = config.seq_len // 2
  # Changing later tokens of the first segment leaves earlier logits alone (causality) ...
  changed = b["inputs"].copy()
  changed[:, cut - 2:] = (changed[:, cut - 2:] + 1) % config.model.vocab_size
  other = model.apply({"params": params}, changed, b["positions"], b["segment_ids"])
  np.testing.assert_allclose(other[:, :cut - 2], logits[:, :cut - 2], atol=1e-6)
  # ... and the second segment sees nothing of the first: same logits as running it alone.
  alone = model.apply({"params": params}, b["inputs"][:, cut:], b["positions"][:, cut:])
  np.testing.assert_allclose(alone, logits[:, cut:], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_all"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  config = tiny_config()
  batch = random_batch(config)
  results = []
  for remat in ("none", policy):
    config.model.remat = remat
    task = tasks.make_task(config)
    params = nn.unbox(task.init(jax.random.key(0), config.seq_len))
    results.append(jax.value_and_grad(lambda p, t=task: t.loss(p, batch, None, True)[0])(params))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  # Same math in another fusion order: tolerances relative to the largest gradient entry (some
  # entries, e.g. the key bias's, are exactly zero in theory and 1e-10 noise in practice).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_bfloat16_compute_tracks_float32():
  """bf16 compute from fp32 master params gives the fp32 logits of the same weights within 1.2%
  of their spread (measured 0.6%: about what rounding the weights by 0.3% costs). The loss
  cannot tell (at random init it is ~ln V whatever the model computes), the logits can: an fp32
  model that lacks a layer (~50%) or whose weights differ by 1% (~2%) is outside the tolerance,
  and a bf16 run that silently computed in fp32 (~1e-7) fails the lower bound. (At this size a
  bf16 softmax or bf16 LayerNorm statistics stay within the tolerance: 0.6% and 0.7%.)"""
  config = tiny_config(dtype="bfloat16")
  batch = random_batch(config)
  _, params = _init(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 master params

  def logits(params, **model_fields):
    model, _ = build_model(tiny_config(**model_fields).model)
    out = model.apply({"params": params}, batch["inputs"], batch["positions"],
                      batch["segment_ids"]).astype(jnp.float32)
    return np.asarray(out - out.mean(-1, keepdims=True))  # softmax ignores a shift

  fp32 = logits(params)

  def distance(other):
    return float(np.linalg.norm(other - fp32) / np.linalg.norm(fp32))

  assert 1e-3 < distance(logits(params, dtype="bfloat16")) < 1.2e-2
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  noisy = jax.tree.unflatten(tree, [x * (1 + 1e-2 * jax.random.normal(k, x.shape))
                                    for k, x in zip(keys, leaves)])
  assert distance(logits(noisy)) > 1.2e-2
  one_layer = {"transformer": {k: v for k, v in params["transformer"].items() if k != "h_1"}}
  assert distance(logits(one_layer, n_layer=1)) > 1.2e-2


def test_unknown_remat_policy_is_named():
  config = tiny_config(remat="sometimes")
  with pytest.raises(ValueError, match=r"config.model.remat='sometimes'"):
    _init(config)
