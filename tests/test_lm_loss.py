"""The fused, chunked LM-head cross-entropy equals the plain full-logits loss and its grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxft import tasks
from jaxft.models.lm_loss import lm_head_cross_entropy
from jaxft.tasks.causal_lm import token_cross_entropy
from tests.helpers import random_batch, tiny_config


def _plain(hidden, embedding, targets, mask):
  logits = jnp.einsum("btd,vd->btv", hidden, embedding)
  losses = token_cross_entropy(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets) * mask
  return jnp.sum(losses * mask), jnp.sum(correct)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])  # 5 -> 4 (divides T=12); 64 -> the whole T
def test_values_and_gradients_match_full_logits(chunk):
  k = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k[0], (3, 12, 16))
  embedding = jax.random.normal(k[1], (97, 16))
  targets = jax.random.randint(k[2], (3, 12), 0, 97)
  mask = (jax.random.uniform(k[3], (3, 12)) > 0.3).astype(jnp.float32)
  fused = lambda h, w: lm_head_cross_entropy(h, w, targets, mask, chunk=chunk)  # noqa: E731
  plain = lambda h, w: _plain(h, w, targets, mask)  # noqa: E731
  for a, b in zip(jax.jit(fused)(hidden, embedding), plain(hidden, embedding)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # a non-unit upstream gradient, as the step's 1/tokens scaling gives
  g_fused = jax.jit(jax.grad(lambda h, w: 0.37 * fused(h, w)[0], (0, 1)))(hidden, embedding)
  g_plain = jax.grad(lambda h, w: 0.37 * plain(h, w)[0], (0, 1))(hidden, embedding)
  for a, b in zip(g_fused, g_plain):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # A frozen embedding (PEFT): the same loss and hidden-state gradient, no embedding gradient.
  frozen = lambda h, w: lm_head_cross_entropy(  # noqa: E731
      h, w, targets, mask, chunk=chunk, embedding_grad=False)
  np.testing.assert_allclose(jax.jit(frozen)(hidden, embedding)[0], plain(hidden, embedding)[0],
                             rtol=1e-6)
  d_h, d_w = jax.jit(jax.grad(lambda h, w: 0.37 * frozen(h, w)[0], (0, 1)))(hidden, embedding)
  np.testing.assert_allclose(d_h, g_plain[0], atol=1e-6, rtol=1e-5)
  assert not np.any(d_w)


def test_task_loss_and_grads_equal_with_and_without_fusion():
  losses, grads = [], []
  for chunk in (0, 4):
    config = tiny_config()
    config.lm_loss_chunk = chunk
    task = tasks.make_task(config)
    params = nn.unbox(task.init(jax.random.key(0), config.seq_len))
    batch = random_batch(config)
    (loss, aux), g = jax.value_and_grad(task.loss, has_aux=True)(params, batch, None, True)
    losses.append((loss, aux["correct"], aux["tokens"]))
    grads.append(g)
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
