"""PEFT (jaxft/peft): each method's parameters, what trains, merging, generation with a KV
cache, AdaLoRA's budget, and whole runs: the base the train step used bit-identical to the
file, export to transformers, adapter-only files, resume, and the errors a user can cause."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors.numpy import load_file

from configs import finetune
from jaxft import export, hf, peft, tasks, train, trees
from jaxft.models import generation
from jaxft.parallel import sharding
from jaxft.peft import adalora
from jaxft.run import checkpoint, optim, steps
from jaxft.run import state as state_lib
from tests import helpers
from tests.helpers import (
  loss_rows,
  random_batch,
  save_tiny_bert,
  set_fields,
  tiny_config,
  topic_rows,
  train_config,
  write_csv,
)

METHODS = ["lora", "adalora", "adapter", "prefix", "prompt"]


def bert_task(method="none", scan_layers=False, **fields):
  config = finetune.get_config("classification")
  config.init_from = ""
  config.model.update(dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, scan_layers=scan_layers))
  config.seq_len = 16
  config.peft.method = method
  set_fields(config.peft, fields)
  return tasks.make_task(config, labels=["a", "b", "c"])


def bert_batch(seed=0, b=4, t=16):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, t + 1, size=b)
  segment_ids = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return {"inputs": rng.integers(0, 1000, size=(b, t)).astype(np.int32) * segment_ids,
          "segment_ids": segment_ids, "token_types": np.zeros((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def init_variables(task, seed=0):
  return nn.unbox(task.init(jax.random.key(seed), task.config.seq_len))


def perturb(variables, seed=1, scale=0.05):
  """Random non-zero PEFT params (B and E start at zero, which would hide mistakes)."""
  leaves = trees.flat(variables[peft.COLLECTION])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = {k: v + scale * jax.random.normal(key, v.shape) for key, (k, v) in
           zip(keys, leaves.items())}
  from flax import traverse_util
  return {**variables, peft.COLLECTION: traverse_util.unflatten_dict(noisy)}


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter"])
def test_starts_as_the_base_model(method):
  """LoRA's B, AdaLoRA's E and the adapters' up-projection start at zero."""
  task, base = bert_task(method), bert_task("none")
  variables = init_variables(task)
  batch = bert_batch()
  np.testing.assert_array_equal(task.logits(variables, batch),
                                base.logits({"params": variables["params"]}, batch))
  assert trees.flat(variables[peft.COLLECTION])


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_merge_equals_unmerged(method, scan_layers):
  """(Also with scan_layers, where A, B, E and the kernels carry a leading layer axis.)"""
  task = bert_task(method, scan_layers, targets="attn.*|mlp.*")
  base = bert_task("none", scan_layers)
  variables = perturb(init_variables(task), scale=0.3)
  merged = task.peft.merge(variables)
  batch = bert_batch()
  unmerged = task.logits(variables, batch)
  assert not np.allclose(unmerged, base.logits({"params": variables["params"]}, batch),
                         atol=1e-3)  # the update matters
  np.testing.assert_allclose(base.logits(merged, batch), unmerged, atol=1e-5, rtol=0)


def test_targets_select_modules_and_keep_their_logical_axes():
  task = bert_task("lora", targets="attn.*|mlp.*")
  boxed = task.init(jax.random.key(0), 16)
  adapted = sorted("/".join(k[:-1]) for k in trees.flat(nn.unbox(boxed)["peft"])
                   if k[-1] == "lora_a")
  assert adapted == [f"bert/layer_{i}/{m}" for i in range(2) for m in
                     ("attn/key", "attn/out", "attn/query", "attn/value", "mlp/fc", "mlp/proj")]
  a = boxed["peft"]["bert"]["layer_0"]["attn"]["query"]
  assert a["lora_a"].names == ("embed", None) and a["lora_b"].names == (None, "heads", "kv")
  default = bert_task("lora")
  q_and_v = {"/".join(k[:-1]) for k in trees.flat(init_variables(default)["peft"])}
  assert q_and_v == {f"bert/layer_{i}/attn/{m}" for i in range(2) for m in ("query", "value")}


@pytest.mark.parametrize("method", METHODS)
def test_only_peft_and_head_train_and_optimizer_state_scales_with_them(method):
  task = bert_task(method, adapter_size=4, num_virtual_tokens=4)
  config = task.config
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx, _ = optim.make_optimizer(config.optim, 10, task.peft)
  state, frozen, _, _ = state_lib.create_train_state(
      task, tx, seq_len=16, seed=0, mesh=mesh, axis_rules=config.axis_rules)
  trainable = {"/".join(k) for k in trees.flat(state.params)}
  assert all(k.startswith(("peft/", "params/classifier/")) for k in trainable), trainable
  assert {"params/classifier/kernel", "params/classifier/bias"} <= trainable
  assert not any(k[0] == "peft" for k in trees.flat(frozen))
  # Adam keeps two moments per trainable parameter; nothing for the frozen ones.
  trainable_bytes = trees.nbytes(state.params)
  assert 2 * trainable_bytes <= trees.nbytes(state.opt_state) <= 2 * trainable_bytes + 4096 + (
      3 * trainable_bytes if method == "adalora" else 0)  # AdaLoRA: I_bar, U_bar, mask
  full = bert_task("none")
  full_state, full_frozen, _, _ = state_lib.create_train_state(
      full, tx if method != "adalora" else optim.make_optimizer(config.optim, 10)[0],
      seq_len=16, seed=0, mesh=mesh, axis_rules=config.axis_rules)
  assert not full_frozen
  assert trees.nbytes(state.opt_state) < 0.25 * trees.nbytes(full_state.opt_state)


def _causal(method, scan_layers=False, **fields):
  config = tiny_config(scan_layers=scan_layers)
  config.peft.method = method
  set_fields(config.peft, {"num_virtual_tokens": 3, **fields})
  return config, tasks.make_task(config)


@pytest.mark.parametrize("method,scan_layers", [("prefix", False), ("prompt", False),
                                                ("prefix", True)])
def test_decoding_with_kv_cache_equals_full_recompute(method, scan_layers):
  """Prefill + one-token steps with the KV cache give the logits of a full forward pass over
  the same tokens: the prefix / soft prompt conditions every cached step (also with the
  per-layer prefixes and caches stacked by scan_layers)."""
  config, task = _causal(method, scan_layers,
                         prefix_projection=16 if method == "prefix" else 0)
  variables = perturb(init_variables(task), scale=0.5)
  model = peft.bind(task.model, task.peft)
  tokens = jnp.asarray([[5, 9, 11, 3, 7, 2, 8, 1], [4, 4, 6, 10, 12, 3, 9, 5]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)
  ones = jnp.ones_like(tokens)
  full = model.apply(variables, tokens, positions, ones)  # [B, T, V]
  base = task.model.apply({"params": variables["params"]}, tokens, positions, ones)
  assert np.abs(np.asarray(full - base)).max() > 1e-3  # the method changes the model

  np.testing.assert_allclose(helpers.cached_logits(model, variables, tokens, positions, 5),
                             full, atol=1e-5, rtol=0)
  # and jaxft.generate, which decodes that way, follows the full model's argmax
  out = generation.generate(model, variables, [[5, 9, 11]], max_new_tokens=4, temperature=0)[0]
  seq = jnp.asarray([[5, 9, 11, *out[:-1]]], jnp.int32)
  again = model.apply(variables, seq, jnp.arange(6)[None], jnp.ones_like(seq))
  assert np.argmax(np.asarray(again[0, 2:]), axis=-1).tolist() == out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adalora_prunes_to_the_budget_and_reads_its_allocation_back(scan_layers):
  """The ranks left, read back from the optimizer state, where the allocation lives (no
  checkpoint round trip here). With scan_layers each stacked layer is its own module of the
  budget."""
  config, task = _causal("adalora", scan_layers, rank=2, init_rank=4, warmup_fraction=0.1,
                         final_fraction=0.3, mask_every=1, targets="attn/(query|value)$")
  assert adalora.budget(0, num_steps=20, t_init=2, t_final=6, init_total=16,
                        target_total=8) == 16
  assert adalora.budget(14, num_steps=20, t_init=2, t_final=6, init_total=16,
                        target_total=8) == 8
  config.num_steps = 20
  config.optim.lr = 1e-2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx, schedule = optim.make_optimizer(config.optim, 20, task.peft)
  state, frozen, shardings, _ = state_lib.create_train_state(
      task, tx, seq_len=config.seq_len, seed=0, mesh=mesh, axis_rules=config.axis_rules)
  step = jax.jit(steps.make_train_step(task.loss, tx, schedule, 1,
                                       regularizer=task.peft.regularizer))
  batch = random_batch(config)
  for _ in range(20):
    state, m = step(state, frozen, batch)
    assert np.isfinite(float(m["loss"]))
  ranks = adalora.rank_pattern(state.opt_state)
  assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4  # rank 2 on average over 4 modules
  assert ("transformer/h/attn/query[1]" in ranks) == scan_layers
  e = [v for k, v in trees.flat(state.params["peft"]).items() if k[-1] == "lora_e"]
  assert sum(int((np.asarray(x) != 0).sum()) for x in e) == 8
  reg = task.peft.regularizer(trees.combine(frozen, state.params))
  assert float(reg) > 0


def test_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config\.peft\.method='loha' is unknown"):
    bert_task("loha")
  with pytest.raises(ValueError, match=r"config\.peft\.targets='nothing' matches no module.*"
                                       r"bert/layer_0/attn/query"):
    init_variables(bert_task("lora", targets="nothing"))
  with pytest.raises(ValueError, match=r"config\.peft\.init_rank=4 must be >= "
                                       r"config\.peft\.rank=8"):
    init_variables(bert_task("adalora", init_rank=4))
  task = bert_task("adapter")
  with pytest.raises(ValueError, match=r"'adapter' .* cannot be merged .* --adapter_only"):
    task.peft.merge(init_variables(task))
  task = bert_task("lora", trainable="layer_9/")  # a 2-layer model
  with pytest.raises(ValueError, match=r"config\.peft\.trainable='layer_9/' matches no "
                                       r"parameter.*bert/"):
    task.peft.trainable_mask(init_variables(task), task.trainable_head)
  for field, pattern in (("targets", "layer_1/attn/query$"), ("trainable", "bert/layer_1/")):
    with pytest.raises(ValueError, match=rf"config\.peft\.{field}='{re.escape(pattern)}' names "
                                         r"a single "
                                         r"layer, but with config\.model\.scan_layers=True"):
      bert_task("lora", scan_layers=True, **{field: pattern})
  bert_task("lora", scan_layers=False, targets="layer_1/attn/query$")  # fine without scan


# -- whole runs --------------------------------------------------------------------------------

def _run_config(tmp_path, tiny_bert, method, **overrides):
  config = finetune.get_config("classification")
  config.init_from = tiny_bert
  config.data.train = write_csv(tmp_path / "train.csv", topic_rows(160, 0))
  config.data.validation = write_csv(tmp_path / "val.csv", topic_rows(40, 1))
  config.data.data_dir = str(tmp_path / "tfds")
  config.seq_len = 32
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 0
  config.num_steps = 30
  config.eval_every = 15
  config.optim.lr = 3e-3
  config.peft.method = method
  return set_fields(config, overrides)


def _record_train_steps(monkeypatch) -> list:
  """Wraps the real jitted train step that jaxft/training/setup.py builds: the list gets, per
  call, the `frozen` tree handed to the step and the keys of the state's params (what the step
  differentiates)."""
  calls, real = [], steps.jit_steps

  def jit_steps(*args, **kwargs):
    train_step, *rest = real(*args, **kwargs)

    def recording(state, frozen, batch):
      calls.append((frozen, {"/".join(k) for k in trees.flat(state.params)}))
      return train_step(state, frozen, batch)
    return (recording, *rest)

  monkeypatch.setattr(steps, "jit_steps", jit_steps)
  return calls


def test_lora_run_freezes_the_base_exports_merged_and_saves_a_small_adapter(tmp_path, tiny_bert,
                                                                           monkeypatch):
  config = _run_config(tmp_path, tiny_bert, "lora", num_steps=40, eval_every=20,
                       **{"peft.targets": "attn.*|mlp.*", "peft.lr": 1e-2})
  workdir = str(tmp_path / "run")
  calls = _record_train_steps(monkeypatch)
  val = train.train_and_evaluate(config, workdir)
  assert val["accuracy"] >= 0.8
  counts = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][0]
  assert 0 < counts["params/trainable"] < counts["params/total"]
  assert counts["params/trainable_percent"] == pytest.approx(
      100 * counts["params/trainable"] / counts["params/total"])

  _, task, variables = helpers.open_trained(workdir)
  # Gradients never reach the base: the step differentiates LoRA and the head only, and the
  # frozen tree the step was handed holds every other variable: the whole BERT backbone.
  assert len(calls) == 40
  frozen, trainable = calls[-1]
  assert all(t == trainable for _, t in calls)
  assert all(k.startswith(("peft/", "params/classifier/")) for k in trainable), trainable
  everything = {"/".join(k) for k in trees.flat(variables)}
  frozen_keys = {"/".join(k) for k in trees.flat(frozen)}
  assert frozen_keys == {k for k in everything if k.startswith("params/bert/")}
  assert frozen_keys | trainable == everything
  # That base: the same arrays at all 40 steps, and after training still bit-identical to the
  # Hugging Face file the run started from (read here without jaxft's loader).
  assert all(all(a is b for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(frozen)))
             for f, _ in calls)
  original = load_file(os.path.join(tiny_bert, "model.safetensors"))
  used = hf.to_hf_tensors(jax.device_get(frozen["params"]["bert"]), "BertModel")
  assert used.keys() == original.keys()  # every tensor of the file, pooler included
  for name, value in used.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)

  # Export merges LoRA: transformers' BertForSequenceClassification gives jaxft's logits.
  export.export(workdir, str(tmp_path / "hf"))
  exported = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  b = task.eval_batches("validation")[0]
  ours = helpers.eval_outputs(task, variables, [b])[0]["logits"]
  with torch.no_grad():
    theirs = exported(input_ids=torch.from_numpy(b["inputs"]).long(),
                      attention_mask=torch.from_numpy(b["segment_ids"]).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

  # Adapter-only: a small file that, on the same base, predicts exactly as the run.
  adapter_dir = str(tmp_path / "adapter")
  export.export_adapter(workdir, adapter_dir)
  size = os.path.getsize(os.path.join(adapter_dir, checkpoint.ADAPTER_FILE))
  assert size < 0.2 * os.path.getsize(os.path.join(tiny_bert, "model.safetensors"))
  _, task2, reloaded = helpers.open_trained(adapter_dir)
  np.testing.assert_array_equal(helpers.eval_outputs(task2, reloaded, [b])[0]["logits"], ours)


def test_peft_run_resumes_and_checks_its_base(tmp_path, tiny_bert, caplog):
  """A run resumed from its step-6 checkpoint ends bit-identical to one that never stopped
  (the frozen base is rebuilt from init_from, not saved); a changed base is refused."""
  config = _run_config(tmp_path, tiny_bert, "adapter", num_steps=12, eval_every=6,
                       checkpoint_every=6)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "12"))  # as if killed after step 6
  with caplog.at_level(logging.INFO, logger="jaxft"):
    train.train_and_evaluate(config, resumed)
  assert f"resumed from step 6 in {resumed}/checkpoints" in caplog.text
  # Steps 7-12 trained once more, not 1-12 again: each step's rows once (log_every=10), those
  # of steps 10 and 12 the uninterrupted run's.
  rows = loss_rows(resumed)
  assert [s for s, t, _ in rows if t is not None] == [6, 10, 12]
  assert [s for s, _, v in rows if v is not None] == [6, 12]
  assert rows == loss_rows(straight)
  _, _, a = helpers.open_trained(straight, best=False)
  _, _, b = helpers.open_trained(resumed, best=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  shutil.rmtree(os.path.join(resumed, "checkpoints", "12"))
  other = save_tiny_bert(tmp_path / "other_bert", seed=1)  # another base, same shapes
  with pytest.raises(ValueError, match=r"config\.init_from=.* no longer holds the base model"):
    train.train_and_evaluate(set_fields(config, {"init_from": other}), resumed)
  # Adapters after attention only: another set of adapter params, refused naming the field.
  config = set_fields(config, {"init_from": tiny_bert, "peft.targets": r"attn/out$"})
  with pytest.raises(ValueError, match=r"another train state .* config\.peft\.targets="
                                       r"'attn/out\$' \(the checkpoints' ''\)"):
    train.train_and_evaluate(config, resumed)


def test_prompt_tuning_on_a_jaxft_workdir_base(tmp_path):
  """config.init_from may be a jaxft run: prompt-tune a pretrained causal LM."""
  base_dir = str(tmp_path / "base")
  train.train_and_evaluate(train_config(tmp_path, num_steps=4, eval_every=100), base_dir)
  config = train_config(tmp_path, num_steps=4, eval_every=100, init_from=base_dir)
  config.peft.method = "prompt"
  config.peft.num_virtual_tokens = 4
  config.sample.max_new_tokens = 4
  workdir = str(tmp_path / "prompted")
  train.train_and_evaluate(config, workdir)
  _, _, base = helpers.open_trained(base_dir)
  _, task, tuned = helpers.open_trained(workdir)
  for key, value in trees.flat(base["params"]).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(trees.flat(tuned["params"])[key]))
  assert trees.flat(tuned["peft"])[("transformer", "extend_inputs", "prompt")].shape == (4, 32)
  with pytest.raises(ValueError, match="--adapter_only"):
    export.export(workdir, str(tmp_path / "hf"))
  # prompt_eval scores with the prompt-tuned model (the soft prompt changes every score)
  from jaxft import prompt_eval

  rows = [{"text": f"the king {w}", "label": "love" if i % 2 else "war"}
          for i, w in enumerate("speak night day sword crown castle peace fair".split() * 2)]
  files = {}
  for split, part in (("train", rows[:8]), ("validation", rows[8:12]), ("test", rows[12:])):
    files[split] = str(tmp_path / f"{split}.jsonl")
    with open(files[split], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)
  scores = {}
  for name, run_dir in (("base", base_dir), ("tuned", workdir)):
    result = prompt_eval.run(workdir=run_dir, data_dir=str(tmp_path / "tfds_eval"),
                             options=prompt_eval.Options(k=1), **files)
    scores[name] = [p["logprobs"]["war"] for p in result["predictions"]]
  assert len(scores["tuned"]) == 4 and not np.allclose(scores["base"], scores["tuned"])
