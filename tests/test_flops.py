"""Model FLOPs per token (jaxft/models/flops.py, Task.flops_per_token) against the matmuls JAX
really traces: every dot_general of the jitted training step's forward + backward, counted from
its jaxpr (2·M·N·K each, scan bodies times their length), for every family and head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend import core as jex_core

from configs import bert_mlm
from configs import finetune as finetune_configs
from jaxft import tasks, trees
from jaxft.run import flops as run_flops
from tests.helpers import TINY_BERT, tiny_config

B, T = 4, 32


def _dot_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += times * _dot_flops(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += times * _dot_flops(sub)
  return total


def _bert_config(task: str, tokenizer: str, **data):
  config = finetune_configs.get_config("classification")
  config.task = task
  config.model.update(family="bert", vocab_size=30522, hidden_dropout_prob=0.1, **TINY_BERT)
  config.data.tokenizer = tokenizer
  config.data.update(data)
  config.seq_len, config.batch_size = T, B
  return config


def _batch(task) -> dict:
  z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
  batch = {"inputs": z(B, T), "segment_ids": jnp.ones((B, T), jnp.int32), "token_types": z(B, T),
           "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
           "example_mask": jnp.ones((B,), jnp.float32)}
  name = task.name
  if name == "causal_lm":
    return {**batch, "targets": z(B, T), "loss_mask": jnp.ones((B, T), jnp.float32)}
  if name == "classification" and task.packing:
    k = task.slots
    return {**batch, "labels": z(B, k), "example_mask": jnp.ones((B, k), jnp.float32),
            "example_index": z(B, k)}
  extra = {"classification": {"labels": z(B)},
           "token_classification": {"labels": z(B, T), "label_mask": jnp.ones((B, T))},
           "question_answering": {"start_positions": z(B), "end_positions": z(B)},
           "masked_lm": {}}[name]
  return {**batch, **extra}


def _cases(tokenizer):
  gpt2_lm = tiny_config()
  gpt2_lm.seq_len = T
  gpt2_cls = tiny_config()
  gpt2_cls.update(task="classification", seq_len=T)
  mlm = bert_mlm.get_config("tiny")
  mlm.model.update(**TINY_BERT)
  mlm.data.tokenizer, mlm.seq_len = tokenizer, T
  return {
      "gpt2 causal_lm (fused LM loss)": (gpt2_lm, None),
      "gpt2 classification": (gpt2_cls, ["a", "b", "c"]),
      "bert classification": (_bert_config("classification", tokenizer), ["a", "b", "c"]),
      "bert classification, packed": (
          _bert_config("classification", tokenizer, packing=True, pack_slots=5), ["a", "b"]),
      "bert token_classification": (_bert_config("token_classification", tokenizer),
                                    ["O", "B-x", "I-x"]),
      "bert question_answering": (_bert_config("question_answering", tokenizer), None),
      "bert masked_lm": (mlm, None),
  }


def test_flops_per_token_equal_the_traced_matmuls_of_every_head(tiny_bert):
  """3x the forward matmuls = forward + backward (each dot's activation and weight gradient);
  the convention halves causal attention, whose full T x T scores XLA still computes."""
  for case, (config, labels) in _cases(tiny_bert).items():
    task = tasks.make_task(config, labels=labels)
    variables = jax.eval_shape(lambda task=task: task.init(jax.random.key(0), T))
    variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), variables)
    variables = nn.unbox(variables)
    batch = _batch(task)

    def loss(params, task=task, variables=variables, batch=batch):
      return task.loss({**variables, "params": params}, batch, jax.random.key(0), False)[0]

    forward = _dot_flops(jax.make_jaxpr(loss)(variables["params"]).jaxpr)
    train = _dot_flops(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr)
    assert train == pytest.approx(3 * forward, rel=1e-9), case
    backbone = task.model_cfg.flops_backbone
    skipped = 6.0 * backbone.layers * T * backbone.attention_width if backbone.causal else 0.0
    assert task.flops_per_token(T) == pytest.approx(train / (B * T) - skipped,
                                                    rel=1e-9), case


def test_throughput_figures_per_device():
  out = run_flops.throughput(8000.0, 1e9, 1e12, devices=4)
  assert out == {"tokens_per_s": 8000.0, "tokens_per_s_per_device": 2000.0,
                 "model_tflops_per_s_per_device": 2.0, "mfu": 2.0}
  assert "mfu" not in run_flops.throughput(8000.0, 1e9, float("nan"), devices=4)


@pytest.mark.parametrize("case", ["gpt2 causal_lm (fused LM loss)", "bert classification"])
def test_a_frozen_base_and_head_count_no_weight_gradients(tiny_bert, case):
  """LoRA: gradients are taken for the adapters and the task's classifier only, so the frozen
  matmuls (the base, a tied LM head, BERT's pooler) count 4·N. The traced step differs from
  the count by the rank-r adapter matmuls and the first layer's input gradient, which nothing
  needs; counting 6·N for the frozen weights would be far off."""
  config, labels = _cases(tiny_bert)[case]
  config.lm_loss_chunk = 0  # autodiff decides which gradients are taken
  full = tasks.make_task(config, labels=labels)
  config.peft.method = "lora"
  task = tasks.make_task(config, labels=labels)
  variables = jax.eval_shape(lambda: task.init(jax.random.key(0), T))
  variables = nn.unbox(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), variables))
  trainable, frozen = trees.split(variables, task.peft.trainable_mask(variables,
                                                                      task.trainable_head))
  batch = _batch(task)

  def loss(params):
    return task.loss(trees.combine(frozen, params), batch, jax.random.key(0), False)[0]

  traced = _dot_flops(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr) / (B * T)
  backbone = task.model_cfg.flops_backbone
  skipped = 6.0 * backbone.layers * T * backbone.attention_width if backbone.causal else 0.0
  assert task.flops_per_token(T) + skipped == pytest.approx(traced, rel=0.08)
  assert full.flops_per_token(T) + skipped > 1.3 * traced
