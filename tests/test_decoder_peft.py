"""Every PEFT method on the decoder family (GQA, rotary, sliding windows): it changes the
model, trains only its own parameters, decodes through the KV cache exactly as a full forward,
and LoRA / AdaLoRA merge into a plain model of the same class."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llama as llama_configs
from jaxft import peft, tasks, trees
from tests.helpers import cached_logits, set_fields
from tests.test_peft import init_variables, perturb

METHODS = ["lora", "adalora", "adapter", "prefix", "prompt"]


def _task(method, scan_layers=False):
  config = llama_configs.get_config("tiny")
  config.model.update(vocab_size=300, hidden_size=48, intermediate_size=64, head_dim=8,
                      num_attention_heads=6, num_key_value_heads=2, sliding_window=4,
                      layer_types=("sliding_attention", "full_attention"),
                      scan_layers=scan_layers, tie_word_embeddings=False)
  config.seq_len = 16
  config.peft.method = method
  set_fields(config.peft, {"num_virtual_tokens": 3, "adapter_size": 4, "rank": 4,
                           "init_rank": 6,
                           "targets": r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"
                           if method in ("lora", "adalora") else ""})
  return tasks.make_task(config)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_decoder(method):
  """(The scanned layout with PEFT: tests/test_peft.py, tests/test_peft_hf_adapter.py.)"""
  task = _task(method)
  variables = perturb(init_variables(task), scale=0.3)
  targeted = {"/".join(k[:-1]) for k in trees.flat(variables[peft.COLLECTION])}
  if method in ("lora", "adalora"):  # q, k, v, o and gate, up, down of every layer
    names = {p.split("/", 2)[-1] for p in targeted}
    assert names == {f"attn/{n}" for n in ("query", "key", "value", "out")} | {
        f"mlp/{n}" for n in ("gate", "up", "down")}, names
  model = peft.bind(task.model, task.peft)
  tokens = jnp.asarray([[5, 9, 11, 3, 7, 2, 8, 1], [4, 4, 6, 10, 12, 3, 9, 5]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)
  ones = jnp.ones_like(tokens)
  full = model.apply(variables, tokens, positions, ones)
  base = task.model.apply({"params": variables["params"]}, tokens, positions, ones)
  assert np.abs(np.asarray(full - base)).max() > 1e-3  # the method changes the model

  # Prefill 5 tokens, then one at a time through the GQA / sliding-window cache.
  np.testing.assert_allclose(cached_logits(model, variables, tokens, positions, 5), full,
                             atol=1e-5, rtol=0)

  if method in ("lora", "adalora"):  # merged: a plain decoder with the same outputs
    merged = task.peft.merge(variables)
    plain = task.model.apply(merged, tokens, positions, ones)
    np.testing.assert_allclose(plain, full, atol=1e-5, rtol=0)

  # A gradient step touches the method's parameters only (the base is frozen).
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "positions": positions,
           "segment_ids": ones, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
  grads = jax.grad(lambda p: task.loss({**variables, peft.COLLECTION: p}, batch, None,
                                       True)[0])(variables[peft.COLLECTION])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
