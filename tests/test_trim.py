"""Structured trimming (jaxft/trimming): the trimmed model computes what the original computes
with the removed heads / neurons / layers masked to zero; the Taylor importance is the mask
gradient torch autograd gives on the transformers model; trimmed BERT and Llama export to
transformers with the same logits; a run goes in and a trimmed (recovered) workdir comes out."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from configs import finetune
from jaxft import export, hf, tasks
from jaxft.models import registry
from jaxft.run import loader
from jaxft.trimming import masks as masks_lib
from jaxft.trimming import prune, scores, workflow
from tests.helpers import set_fields, topic_rows, write_csv

BERT = dict(family="bert", vocab_size=120, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=4, intermediate_size=40, max_position_embeddings=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT2 = dict(family="gpt2", vocab_size=120, n_positions=32, n_embd=32, n_layer=3, n_head=4,
            embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
LLAMA = dict(family="llama", vocab_size=120, hidden_size=32, intermediate_size=40,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, attention_bias=True, mlp_bias=True)
LABELS = ["a", "b", "c"]


def _perturbed(params, seed=1):
  """Every leaf nudged (flax zero-inits biases: a bias kept from the wrong head would hide)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _model(fields, head):
  cfg = ml_collections.ConfigDict(fields)
  module, model_cfg = registry.build_model(cfg, head, len(LABELS))
  return cfg, module, model_cfg


def _inputs(seed=0, b=3, t=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 120, size=(b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, 9:] = 0  # padding
  return jnp.asarray(tokens), jnp.asarray(seg)


def _apply(module, params, head, tokens, seg):
  if head == "classification":  # BERT: (tokens, segment ids)
    return module.apply({"params": params}, tokens, seg)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return module.apply({"params": params}, tokens, positions, seg)


def _keep_masks(plan, shape):
  """0/1 masks of the original model that keep exactly the plan's units."""
  m = {k: np.zeros(v.shape, np.float32) for k, v in masks_lib.ones(shape).items()}
  for j, layer in enumerate(plan.keep_layers):
    m["layers"][layer] = 1.0
    m["heads"][layer, list(plan.keep_heads[j])] = 1.0
    m["mlp"][layer, list(plan.keep_mlp[j])] = 1.0
  for layer in set(range(shape["layers"])) - set(plan.keep_layers):
    m["heads"][layer] = m["mlp"][layer] = 1.0  # a dropped layer is skipped whole by its gate
  return {k: jnp.asarray(v) for k, v in m.items()}


@pytest.mark.parametrize("fields,head,expect", [
    (BERT, "classification", {"heads": 3, "kv_heads": 3, "mlp": 28, "layers": 2}),
    (GPT2, "causal_lm", {"heads": 3, "kv_heads": 3, "mlp": 90, "layers": 2}),
    # GQA: 2 query heads per KV head; one pruned in each group, both KV heads stay
    (LLAMA, "causal_lm", {"heads": 2, "kv_heads": 2, "mlp": 28, "layers": 2}),
])
def test_trimmed_model_equals_the_masked_original(fields, head, expect):
  cfg, module, model_cfg = _model(fields, head)
  tokens, seg = _inputs()
  params = _perturbed(nn.unbox(module.init(jax.random.key(0), tokens[:1], *(
      [] if fields is BERT else [jnp.zeros_like(tokens[:1])])))["params"])
  family = masks_lib.family_of(cfg)
  shape = masks_lib.shape_of(model_cfg, family)
  rng = np.random.default_rng(3)  # arbitrary scores: any choice of units must be exact
  fake = {"heads": rng.random((3, shape["heads"])), "mlp": rng.random((3, shape["mlp"])),
          "layers": np.array([0.5, 0.1, 0.9])}
  plan = prune.make_plan(fake, shape, heads=0.3, mlp=0.3, drop_layers=1)
  assert {k: plan.shape[k] for k in expect} == expect and plan.keep_layers == (0, 2)

  trimmed_cfg = cfg.copy_and_resolve_references()
  trimmed_cfg.update(prune.model_overrides(cfg, plan, family, shape))
  small, small_cfg = registry.build_model(trimmed_cfg, head, len(LABELS))
  small_params = prune.apply_plan(params, plan, family)
  ours = _apply(small, small_params, head, tokens, seg)
  with masks_lib.applied(_keep_masks(plan, shape), family):
    masked = _apply(module, params, head, tokens, seg)
  full = _apply(module, params, head, tokens, seg)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(masked), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full) - np.asarray(masked)).max() > 1e-3  # the masks do act
  # really smaller: the shapes the modules build
  assert jax.tree.leaves(small_params) and sum(x.size for x in jax.tree.leaves(small_params)) < \
      sum(x.size for x in jax.tree.leaves(params))


def _classifier_task(**model):
  config = finetune.get_config("classification")
  config.init_from = ""
  config.model.update({k: v for k, v in {**BERT, **model}.items()})
  config.seq_len = 12
  return config, tasks.make_task(config, labels=LABELS)


def _cls_batch(seed=0):
  tokens, seg = _inputs(seed)
  b, t = tokens.shape
  return {"inputs": tokens, "segment_ids": seg, "token_types": jnp.zeros_like(tokens),
          "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
          "labels": jnp.asarray([0, 2, 1], jnp.int32), "example_mask": jnp.ones((b,))}


def test_zero_importance_heads_are_pruned_and_change_nothing():
  config, task = _classifier_task()
  params = _perturbed(nn.unbox(task.init(jax.random.key(0), 12))["params"])
  for layer, idle in ((0, 0), (1, 2)):  # a head whose output projection is zero does nothing
    out = params["bert"][f"layer_{layer}"]["attn"]["out"]["kernel"]  # [heads, dh, embed]
    params["bert"][f"layer_{layer}"]["attn"]["out"]["kernel"] = out.at[idle].set(0.0)
  family = masks_lib.FAMILIES["bert"]
  shape = masks_lib.shape_of(task.model_cfg, family)
  s = scores.importance(task, params, [_cls_batch(0), _cls_batch(1)], family, shape)
  assert s["heads"][0, 0] == 0.0 and s["heads"][1, 2] == 0.0 and (s["heads"][2] > 0).all()
  plan = prune.make_plan(s, shape, heads=0.25, mlp=0.0, drop_layers=0)
  assert plan.keep_heads[:2] == ((1, 2, 3), (0, 1, 3))
  model = config.model.copy_and_resolve_references()
  model.update(prune.model_overrides(config.model, plan, family, shape))
  small, _ = registry.build_model(model, "classification", len(LABELS))
  tokens, seg = _inputs()
  keep = _keep_masks(plan, shape)
  keep["heads"] = keep["heads"].at[:2].set(1.0)  # layers 0 and 1 lost only their idle head
  with masks_lib.applied(keep, family):
    want = task.model.apply({"params": params}, tokens, seg)
  got = small.apply({"params": prune.apply_plan(params, plan, family)}, tokens, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _torch_mask_grads(model, batch, example: int, shape: dict) -> dict:
  """Example `example`'s loss gradient w.r.t. head / neuron masks and layer gates, put on the
  transformers model with hooks and taken by torch autograd."""
  masks = {"heads": torch.ones(shape["layers"], shape["heads"], requires_grad=True),
           "mlp": torch.ones(shape["layers"], shape["mlp"], requires_grad=True),
           "layers": torch.ones(shape["layers"], requires_grad=True)}
  dh, hooks = shape["head_dim"], []

  def scale(key, i, per_unit=1):
    return lambda mod, args: (args[0] * masks[key][i].repeat_interleave(per_unit),)

  def gate(i):
    def hook(mod, args, kwargs, output):
      x = args[0] if args else kwargs["hidden_states"]
      y = output[0] if isinstance(output, tuple) else output
      y = x + masks["layers"][i] * (y - x)
      return (y, *output[1:]) if isinstance(output, tuple) else y
    return hook

  for i, layer in enumerate(model.bert.encoder.layer):
    hooks += [layer.attention.output.dense.register_forward_pre_hook(scale("heads", i, dh)),
              layer.output.dense.register_forward_pre_hook(scale("mlp", i)),
              layer.register_forward_hook(gate(i), with_kwargs=True)]
  row = slice(example, example + 1)
  logits = model(input_ids=torch.tensor(np.array(batch["inputs"][row]), dtype=torch.long),
                 attention_mask=torch.tensor(np.array(batch["segment_ids"][row]),
                                             dtype=torch.long),
                 token_type_ids=torch.zeros(1, batch["inputs"].shape[1], dtype=torch.long)).logits
  torch.nn.functional.cross_entropy(logits, torch.tensor([int(batch["labels"][example])]),
                                    reduction="sum").backward()
  for h in hooks:
    h.remove()
  return {k: m.grad.numpy() for k, m in masks.items()}


def test_taylor_scores_match_torch_autograd_on_transformers(tmp_path):
  config, task = _classifier_task()
  params = _perturbed(nn.unbox(task.init(jax.random.key(0), 12))["params"])
  batch = _cls_batch()
  family = masks_lib.FAMILIES["bert"]
  shape = masks_lib.shape_of(task.model_cfg, family)
  ours = scores.mask_gradients(task, params, batch, family, shape)  # [L, B, ...]

  hf.save_hf(str(tmp_path), params, task.model_cfg, architecture="BertForSequenceClassification",
             labels=LABELS)
  model = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
  for example in range(batch["inputs"].shape[0]):
    theirs = _torch_mask_grads(model, batch, example, shape)
    for key in ("heads", "mlp", "layers"):
      np.testing.assert_allclose(ours[key][:, example], theirs[key], atol=2e-5, rtol=1e-3)
  assert np.abs(ours["heads"]).max() > 1e-3  # a real signal, not zeros matching zeros


@pytest.mark.parametrize("fields,architecture,expect", [
    # GQA Llama: one query head pruned per KV group, explicit head_dim: fewer heads load
    ({**LLAMA, "attention_bias": False},  # transformers ties a q/k/v bias to an output bias
     "LlamaForCausalLM",
     lambda c: (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
                c.num_hidden_layers) == (2, 2, 8, 30, 2)),
    # GPT-2: 2 of 4 heads kept, written back as 4 with zeros; n_inner 96 of 128; 2 layers
    (GPT2, "GPT2LMHeadModel",
     lambda c: (c.n_head, c.n_inner, c.n_layer) == (4, 96, 2)),
])
def test_trimmed_decoders_load_in_transformers(tmp_path, fields, architecture, expect):
  cfg, module, model_cfg = _model(fields, "causal_lm")
  tokens, _ = _inputs()
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  params = _perturbed(nn.unbox(module.init(jax.random.key(0), tokens[:1], positions[:1]))[
      "params"])
  family = masks_lib.family_of(cfg)
  shape = masks_lib.shape_of(model_cfg, family)
  rng = np.random.default_rng(0)
  fake = {k: rng.random(v.shape) for k, v in masks_lib.ones(shape).items()}
  plan = prune.make_plan(fake, shape, heads=0.5, mlp=0.25, drop_layers=1)
  small_cfg = cfg.copy_and_resolve_references()
  small_cfg.update(prune.model_overrides(cfg, plan, family, shape))
  small, small_model_cfg = registry.build_model(small_cfg, "causal_lm")
  small_params = prune.apply_plan(params, plan, family)
  hf.save_hf(str(tmp_path), small_params, small_model_cfg, architecture=architecture)
  theirs = getattr(transformers, architecture).from_pretrained(tmp_path).eval()
  assert expect(theirs.config)
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
  got = small.apply({"params": small_params}, tokens, positions)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def _run_config(tmp_path, tiny_bert):
  config = finetune.get_config("classification")
  return set_fields(config, {
      "init_from": tiny_bert, "data.data_dir": str(tmp_path / "tfds"), "seq_len": 32,
      "batch_size": 8, "eval_batch_size": 16, "num_epochs": 0, "optim.lr": 3e-3,
      "data.train": write_csv(tmp_path / "train.csv", topic_rows(96, 0)),
      "data.validation": write_csv(tmp_path / "val.csv", topic_rows(24, 1)),
      "data.test_fraction": 0.25})


def test_trim_a_run_recover_evaluate_and_export(tmp_path, tiny_bert, caplog):
  workdir, out = tmp_path / "run", tmp_path / "trim"
  # The run to trim: a random-init classifier on the tiny BERT, saved as a workdir (a training
  # run would only add the loop's compile time; the recovery below runs the loop).
  config = loader.resolve(_run_config(tmp_path, tiny_bert))
  task = tasks.make_task(config, labels=["money", "sport"])
  params = _perturbed(nn.unbox(task.init(jax.random.key(0), config.seq_len))["params"])
  workflow.write_workdir(str(workdir), config, task.labels, params, {})
  info = workflow.trim(str(workdir), str(out), heads=0.3, mlp=0.3, layers="1",
                       recover_steps=2, calib_batches=2)
  # tiny BERT: 2 layers, 2 heads of 16, MLP 64 -> 1 layer, 1 head, MLP 45
  assert info["shape_after"] == {"layers": 1, "heads": 1, "kv_heads": 1, "mlp": 45,
                                 "head_dim": 16}
  assert info["params_after"] < info["params_before"]
  assert {"metrics_before", "metrics_pruned", "metrics_recovered"} <= set(info)
  run = loader.open_run(str(out))
  assert run.task.model_cfg.num_attention_heads == 1 and run.task.model_cfg.head_dim == 16
  assert loader.open_run(str(out / workflow.PRUNED_DIR)).config.model.intermediate_size == 45

  with caplog.at_level(logging.WARNING, logger="jaxft"):
    export.export(str(out), str(tmp_path / "hf"))
  assert "as zeros" in caplog.text
  theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  assert (theirs.config.num_hidden_layers, theirs.config.intermediate_size,
          theirs.config.num_attention_heads) == (1, 45, 2)  # the pruned head: zeros
  batch = run.task.eval_batches("test")[0]
  with torch.no_grad():
    want = theirs(input_ids=torch.from_numpy(np.asarray(batch["inputs"])).long(),
                  attention_mask=torch.from_numpy(np.asarray(batch["segment_ids"] > 0)).long(),
                  token_type_ids=torch.from_numpy(np.asarray(batch["token_types"])).long()
                  ).logits.numpy()
  got = np.asarray(run.task.logits(run.variables, batch))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  with pytest.raises(ValueError, match="not empty"):  # never overwrites
    workflow.trim(str(workdir), str(out), heads=0.3)


@pytest.mark.parametrize("kwargs,match", [
    ({"heads": 1.0}, "--heads=1.0 must be a fraction"),
    ({"heads": -0.1}, "--heads=-0.1 must be a fraction"),
    ({"mlp": float("nan")}, "--mlp=nan must be a fraction"),
    ({"mlp": 1.5}, "--mlp=1.5 must be a fraction"),
])
def test_bad_fractions_are_named(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    workflow.trim(str(tmp_path / "nowhere"), str(tmp_path / "out"), **kwargs)
  assert not (tmp_path / "out").exists()


def test_bad_layer_counts_and_whole_removals_are_named():
  assert prune.layers_to_drop("2", 6) == 2 and prune.layers_to_drop("0.25", 6) == 2
  for spec, match in (("6", "would drop 6 of the model's 6"), ("1.0", "--layers=1.0 must be"),
                      ("-1", "would drop -1"), ("half", "neither a count")):
    with pytest.raises(ValueError, match=match):
      prune.layers_to_drop(spec, 6)
  shape = {"layers": 2, "heads": 2, "kv_heads": 2, "mlp": 4, "head_dim": 8}
  fake = {"heads": np.ones((2, 2)), "mlp": np.ones((2, 4)), "layers": np.ones(2)}
  with pytest.raises(ValueError, match="--heads=0.9 would remove every head"):
    prune.make_plan(fake, shape, heads=0.9, mlp=0.0, drop_layers=0)
  with pytest.raises(ValueError, match="--mlp=0.9 would remove every MLP neuron"):
    prune.make_plan(fake, shape, heads=0.0, mlp=0.9, drop_layers=0)


def test_scanned_layers_unstack_to_the_per_layer_layout_and_back():
  tokens, seg = _inputs()
  shapes = {}
  for scan in (False, True):
    _, module, _ = _model({**BERT, "scan_layers": scan}, "classification")
    shapes[scan] = nn.unbox(module.init(jax.random.key(0), tokens[:1], seg[:1]))["params"]
  per_layer = workflow._unstack(shapes[True], "layer")
  assert jax.tree.map(np.shape, per_layer) == jax.tree.map(np.shape, shapes[False])
  back = workflow._stack(per_layer, "layer", BERT["num_hidden_layers"])
  assert jax.tree.all(jax.tree.map(np.array_equal, back, jax.tree.map(np.asarray, shapes[True])))
