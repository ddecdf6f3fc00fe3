"""KV-cache decoding equals the full forward pass; sampling options behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxft.models import generation
from jaxft.models.registry import build_model
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def model_and_params():
  config = tiny_config()
  model, _ = build_model(config.model)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), dummy, dummy))["params"]
  # Larger weights than the init's 0.02 so that logits differ clearly between tokens.
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
  return model, params


def _full_logits(model, params, tokens):
  tokens = np.asarray(tokens, np.int32)[None]
  return np.asarray(model.apply({"params": params}, tokens, np.arange(tokens.shape[1])[None]))[0]


def test_incremental_decoding_equals_full_forward_with_left_padding(model_and_params):
  """A batch of two prompts of different lengths (the shorter left-padded), prefilled, then
  fed the same continuation one token at a time: every logit equals a full forward pass."""
  model, params = model_and_params
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 512, 7).tolist(), rng.integers(0, 512, 3).tolist()]
  continuation = rng.integers(0, 512, (2, 6))
  p, n = 7, continuation.shape[1]
  tokens = np.zeros((2, p), np.int32)
  lengths = np.array([7, 3])
  for i, prompt in enumerate(prompts):
    tokens[i, p - len(prompt):] = prompt
  column = np.arange(p)[None]
  segments = (column >= (p - lengths)[:, None]).astype(np.int32)
  positions = np.maximum(column - (p - lengths)[:, None], 0)

  cache = generation.empty_cache(model, 2, p + n)
  step = jax.jit(lambda cache, t, pos, seg: model.apply(
      {"params": params, "cache": cache}, t, pos, seg, decode=True, mutable=["cache"]))
  logits, vars_ = step(cache, tokens, positions, segments)
  steps = [np.asarray(logits)[:, -1]]
  for j in range(n):
    logits, vars_ = step(vars_["cache"], continuation[:, j:j + 1].astype(np.int32),
                         (lengths + j)[:, None], np.ones((2, 1), np.int32))
    steps.append(np.asarray(logits)[:, -1])
  incremental = np.stack(steps, axis=1)  # [B, n + 1, V]

  for i, prompt in enumerate(prompts):
    full = _full_logits(model, params, prompt + continuation[i].tolist())
    np.testing.assert_allclose(incremental[i], full[len(prompt) - 1:], atol=1e-5, rtol=0)


def test_greedy_batch_equals_each_prompt_alone(model_and_params):
  model, params = model_and_params
  prompts = [[5, 9, 200, 31, 7], [42], [100, 101, 102]]
  batch = generation.generate(model, params, prompts, max_new_tokens=12, temperature=0)
  alone = [generation.generate(model, params, [p], max_new_tokens=12, temperature=0)[0]
           for p in prompts]
  assert batch == alone
  # and greedy is argmax of the full forward pass, token by token
  seq = list(prompts[0])
  for _ in range(12):
    seq.append(int(np.argmax(_full_logits(model, params, seq)[-1])))
  assert batch[0] == seq[len(prompts[0]):]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model_and_params):
  model, params = model_and_params
  prompts = [[1, 2, 3], [4, 5]]
  kw = dict(max_new_tokens=16, temperature=1.0)
  a = generation.generate(model, params, prompts, seed=0, **kw)
  assert a == generation.generate(model, params, prompts, seed=0, **kw)
  assert a != generation.generate(model, params, prompts, seed=1, **kw)
  greedy = generation.generate(model, params, prompts, max_new_tokens=16, temperature=0)
  assert generation.generate(model, params, prompts, seed=3, top_k=1, **kw) == greedy
  assert generation.generate(model, params, prompts, seed=3, top_p=1e-6, **kw) == greedy


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(  # noqa: E731
      generation.filter_logits(logits, generation.Sampling(1.0, **kw))))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False, False]
  # smallest set with mass >= 0.8: 0.5 + 0.2 + 0.15
  assert keep(top_p=0.8) == [True, True, True, False, False]
  assert keep(top_p=0.5) == [True, False, False, False, False]
  assert keep(top_k=2, top_p=0.99) == [True, True, False, False, False]


def test_stops_at_eos(model_and_params):
  model, params = model_and_params
  prompts = [[5, 9, 200], [42, 43]]
  free = generation.generate(model, params, prompts, max_new_tokens=10, temperature=0)
  eos = free[0][3]
  stopped = generation.generate(model, params, prompts, max_new_tokens=10, temperature=0,
                              eos_id=eos)
  for row_free, row in zip(free, stopped):
    cut = row_free.index(eos) if eos in row_free else len(row_free)
    assert row == row_free[:cut]
  assert len(stopped[0]) == free[0].index(eos) <= 3


def test_errors_name_the_flag(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match=r"n_positions=64.*--max_new_tokens"):
    generation.generate(model, params, [[1] * 60], max_new_tokens=10)
  with pytest.raises(ValueError, match=r"--temperature=-1"):
    generation.generate(model, params, [[1]], max_new_tokens=2, temperature=-1)
  with pytest.raises(ValueError, match=r"--top_p=0"):
    generation.generate(model, params, [[1]], max_new_tokens=2, top_p=0)
  with pytest.raises(ValueError, match=r"outside \[0, 512\)"):
    generation.generate(model, params, [[600]], max_new_tokens=2)
