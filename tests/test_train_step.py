"""The sharded train step: mesh-shape invariance, gradient accumulation, optimizer masks."""

import itertools

import jax
import numpy as np
import pytest

from jaxft import hf, tasks, trees
from jaxft.parallel import sharding
from jaxft.run import optim, steps
from jaxft.run import state as state_lib
from tests.helpers import random_batch, tiny_config


def run_steps(config, devices, n_steps=3, batch_seed=0, hf_tensors=None):
  """(losses of n_steps train steps on one fixed batch, the final params on the host, the final
  state, the initial params on the host). `hf_tensors` (an HF state dict) replace the random
  initial params."""
  mesh = sharding.make_mesh(config.mesh, devices)
  task = tasks.make_task(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_steps, task.peft)
  variables = None
  if hf_tensors is not None:
    lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
    variables = {**state_lib.random_variables(task, config.seq_len, config.seed, lay),
                 "params": hf.load_params("hf_tensors", lay.abstract["params"],
                                          task.architecture, tensors=hf_tensors)}
  state, frozen, shardings, lay = state_lib.create_train_state(
      task, tx, seq_len=config.seq_len, seed=config.seed, mesh=mesh, axis_rules=config.axis_rules,
      variables=variables)
  step, _, batch_sh, _ = steps.jit_steps(task, tx, schedule, config, lay, shardings, mesh)
  batch = sharding.global_batch(random_batch(config, batch_seed), batch_sh)
  initial = jax.device_get(state.params)  # before the first step donates them
  losses = []
  for _ in range(n_steps):
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  return np.array(losses), jax.device_get(state.params), state, initial


def updating_config(**model):
  """The tiny config without warmup: its first update already has the peak learning rate (with
  the tiny variant's warmup the first update is 0 and proves nothing about the update)."""
  config = tiny_config(**model)
  config.optim.warmup_steps = 0
  return config


def _factorisations(n=8):
  for d, f in itertools.product([1, 2, 4, 8], repeat=2):
    if n % (d * f) == 0:
      yield d, f, n // (d * f)


@pytest.fixture(scope="module")
def reference():
  """(losses, final params, initial params) of 3 updates on one device."""
  config = updating_config()
  config.mesh.data = 1
  losses, params, _, initial = run_steps(config, jax.devices()[:1])
  return losses, params, initial


def assert_same_training(losses, params, reference, flatten=lambda p: trees.flat(p["params"])):
  """Per-step losses and the params after the last update equal the reference's. Adam
  normalises each entry's gradient, so a 1e-7 relative gradient difference in an entry whose
  gradient is near eps moves that entry by up to ~1e-5 (1% of one step's lr): elementwise 5e-5,
  and over the whole tree 1e-3 of the distance the reference's params travelled."""
  ref_losses, ref_params, initial = reference
  # Every update really moved the model: each step's loss by 20x the tolerance below at least.
  assert np.all(np.abs(np.diff(ref_losses)) > 2e-5 * ref_losses[1:]), ref_losses
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=0)
  flat, ref, init = (flatten(t) for t in (params, ref_params, initial))
  assert flat.keys() == ref.keys()
  for key, value in flat.items():
    np.testing.assert_allclose(value, ref[key], rtol=0, atol=5e-5, err_msg=str(key))
  gap = np.sqrt(sum(np.sum((flat[k] - ref[k]) ** 2) for k in ref))
  travelled = np.sqrt(sum(np.sum((ref[k] - init[k]) ** 2) for k in ref))
  assert gap <= 1e-3 * travelled, (gap, travelled)


@pytest.mark.parametrize("data,fsdp,tensor", list(_factorisations()))
def test_every_mesh_shape_gives_the_single_device_loss(reference, data, fsdp, tensor):
  """3 real updates (no warmup) on every data x fsdp x tensor factorisation of 8 devices: the
  losses of each step and the final params of one device."""
  config = updating_config()
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  losses, params, state, _ = run_steps(config, jax.devices())
  assert_same_training(losses, params, reference)
  kernel = state.params["params"]["transformer"]["h_0"]["mlp"]["fc"]["kernel"]
  # [embed, mlp] is split fsdp x tensor ways: per-device bytes shrink as FSDP/TP grow.
  assert kernel.addressable_shards[0].data.size == kernel.size // (fsdp * tensor)


def test_dropout_masks_do_not_depend_on_the_mesh():
  # With dropout on, a sharded run draws the same masks as one device (threefry is
  # partitionable and jaxft's dropout keeps the activation's shape), so losses agree.
  def losses(data, fsdp, tensor, devices):
    config = tiny_config(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return run_steps(config, devices, n_steps=3)[0]

  single = losses(1, 1, 1, jax.devices()[:1])
  no_dropout = run_steps(tiny_config(), jax.devices()[:1], n_steps=3)[0]
  assert np.abs(single - no_dropout).max() > 1e-3  # the masks are really applied
  np.testing.assert_allclose(losses(2, 2, 2, jax.devices()), single, rtol=0, atol=1e-5)
  np.testing.assert_allclose(losses(1, 2, 4, jax.devices()), single, rtol=0, atol=1e-5)


def _record_gradient():
  """An 'optimizer' that keeps the step's final gradient as its state and leaves params alone."""
  import optax
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jax.numpy.zeros_like, params),
      update=lambda grads, _, params=None: (jax.tree.map(jax.numpy.zeros_like, grads), grads))


ACCUM = 4  # micro-batch i of the 8 rows: rows i and i + 4 (steps._split_micro)


def _accum_case(task_name, dropout=0.0):
  """(config, task, batch) whose 4 micro-batches carry unequal real weights: causal LM 2, 6,
  14 and 28 target tokens (the rest padding), classification 2, 1, 1 and 1 real examples."""
  if task_name == "causal_lm":
    config = tiny_config(n_layer=1, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    batch = random_batch(config, 1)
    for row in range(config.batch_size):
      real = [1, 3, 8, 15][row % ACCUM]  # random_batch already masks position 7
      batch["loss_mask"][row, real:] = 0.0
      batch["segment_ids"][row, real + 1:] = 0  # padding after the last real target
    return config, tasks.make_task(config), batch
  from configs import finetune
  config = finetune.get_config("classification")
  config.init_from = ""
  config.model.update(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
  config.seq_len, config.batch_size = 16, 8
  rng = np.random.default_rng(0)
  segment_ids = (np.arange(16)[None] < rng.integers(4, 17, size=(8, 1))).astype(np.int32)
  batch = {"inputs": rng.integers(1, 1000, size=(8, 16), dtype=np.int32) * segment_ids,
           "segment_ids": segment_ids, "token_types": np.zeros((8, 16), np.int32),
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
           "labels": rng.integers(0, 3, size=8).astype(np.int32),
           "example_mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)}  # 3 padding rows
  return config, tasks.make_task(config, labels=["a", "b", "c"]), batch


def _steps(config, task, *grad_accum_steps):
  """A train state on a data=2 mesh, its frozen part, the batch sharding and a real jitted
  train step (steps.jit_steps) per grad_accum_steps, with _record_gradient as the optimizer:
  the params never change, so one state serves several steps."""
  config.mesh.data = 2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  tx = _record_gradient()
  state, frozen, shardings, lay = state_lib.create_train_state(
      task, tx, seq_len=config.seq_len, seed=0, mesh=mesh, axis_rules=config.axis_rules)
  fns = []
  for n in grad_accum_steps:
    config.grad_accum_steps = n
    fns.append(steps.jit_steps(task, tx, lambda s: 1.0, config, lay, shardings, mesh)[0])
  return state, frozen, sharding.batch_sharding(mesh, config.axis_rules), fns


def _micro_weights(batch):
  mask = batch["loss_mask"] if "loss_mask" in batch else batch["example_mask"]
  return [float(mask[i::ACCUM].sum()) for i in range(ACCUM)]


def _assert_same_gradient(a, b):
  """Each tensor within 1e-6 of its norm (elementwise rtol is meaningless for entries near
  zero), plus 1e-9 of the whole gradient's norm for tensors whose gradient is zero in exact
  arithmetic (the key bias's: softmax ignores it) and float noise in practice."""
  b = trees.flat(b)
  floor = 1e-9 * np.sqrt(sum(np.sum(g ** 2) for g in b.values()))
  assert trees.flat(a).keys() == b.keys()
  for key, value in trees.flat(a).items():
    assert np.linalg.norm(value - b[key]) <= 1e-6 * np.linalg.norm(b[key]) + floor, key


@pytest.mark.parametrize("task_name", ["causal_lm", "classification"])
def test_grad_accumulation_weights_micro_batches_by_their_real_tokens(task_name):
  """4 micro-batches of unequal real weight (tokens; examples for classification) give the
  full batch's loss and gradient: one mean over all real tokens, not a mean of 4 means (which
  misses the loss by 100x the tolerance, and the gradient by tens of percent, on this batch)."""
  config, task, batch = _accum_case(task_name)
  assert len(set(_micro_weights(batch))) > 1
  state, frozen, batch_sh, (full_step, acc_step) = _steps(config, task, 1, ACCUM)
  batch = sharding.global_batch(batch, batch_sh)
  state, full = full_step(state, frozen, batch)
  full_grads = jax.device_get(state.opt_state)
  state, acc = acc_step(state, frozen, batch)
  assert float(acc["loss"]) == pytest.approx(float(full["loss"]), rel=1e-6)
  _assert_same_gradient(jax.device_get(state.opt_state), full_grads)


@pytest.mark.parametrize("task_name", ["causal_lm", "classification"])
def test_grad_accumulation_with_dropout_equals_the_full_batch(task_name):
  """Dropout draws each example's masks from its row in the step's batch (models/dropout.py
  per_example), not from its place in a micro-batch: 4 micro-batches of unequal weight with
  dropout 0.2 give the full batch's loss and gradient within 1e-6."""
  config, task, batch = _accum_case(task_name, dropout=0.2)
  state, frozen, batch_sh, (full_step, acc_step) = _steps(config, task, 1, ACCUM)
  params = jax.device_get(state.params)  # before the step donates them
  batch = sharding.global_batch(batch, batch_sh)
  state, full = full_step(state, frozen, batch)
  full_grads = jax.device_get(state.opt_state)
  state, acc = acc_step(state.replace(step=state.step - 1), frozen, batch)  # the same step key
  assert float(acc["loss"]) == pytest.approx(float(full["loss"]), rel=1e-6)
  _assert_same_gradient(jax.device_get(state.opt_state), full_grads)
  # The masks are on: without them the loss moves by 100x the tolerance above (random-init
  # token losses are all near ln V, so masks move it little).
  plain, aux = jax.jit(lambda v, b: task.loss(v, b, None, True))(params, jax.device_get(batch))
  plain = float(plain) / float(aux["weight"])
  assert abs(plain - float(full["loss"])) > 1e-4 * plain


def test_batch_not_divisible_by_data_parallel_size_names_the_field():
  config = tiny_config()
  config.batch_size = 12
  mesh = sharding.make_mesh(config.mesh)  # data = 8
  with pytest.raises(ValueError, match=r"config.batch_size=12 .* data-parallel mesh size 8"):
    sharding.check_batch_divisible(config.batch_size, 1, mesh, config.axis_rules)


def test_mesh_that_does_not_match_the_devices():
  config = tiny_config()
  config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match=r"config.mesh=.* needs 3 devices but 8 are available"):
    sharding.make_mesh(config.mesh)


def test_weight_decay_mask_skips_embeddings_norms_and_biases():
  config = tiny_config()
  task = tasks.make_task(config)
  from flax import linen as nn
  params = nn.unbox(task.init(jax.random.key(0), config.seq_len))["params"]
  mask = optim.weight_decay_mask(params, config.optim)
  t = mask["transformer"]
  assert t["h_0"]["mlp"]["fc"]["kernel"] and t["h_1"]["attn"]["query"]["kernel"]
  assert not t["wte"]["embedding"] and not t["wpe"]["embedding"]
  assert not t["ln_f"]["scale"] and not t["h_0"]["mlp"]["fc"]["bias"]
  config.optim.decay_embeddings = True
  assert optim.weight_decay_mask(params, config.optim)["transformer"]["wte"]["embedding"]


def test_schedule_warmup_then_cosine_to_floor():
  config = tiny_config()
  config.optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  schedule = optim.lr_schedule(config.optim, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, rel=1e-5)  # halfway down the cosine
  assert float(schedule(110)) == pytest.approx(0.1)


def test_weight_decay_mask_on_bert_mlm_skips_every_norm_and_bias():
  from flax import linen as nn

  from configs import bert_mlm

  config = bert_mlm.get_config("tiny")
  task = tasks.make_task(config)
  params = nn.unbox(task.init(jax.random.key(0), config.seq_len))["params"]
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(params, config.optim))[0]}
  decayed = sorted(p for p, v in flat.items() if v)
  assert decayed and all(p.endswith("/kernel") for p in decayed)  # matmul kernels only
  assert not flat["mlm_bias"] and not flat["mlm_ln/scale"] and not flat["bert/layer_0/ln/scale"]
  assert not flat["bert/layer_0/attn/ln/scale"] and not flat["bert/ln_embed/bias"]
  assert not flat["bert/word/embedding"]


def test_linear_schedule_warms_up_over_a_fraction_then_decays_to_zero():
  config = tiny_config()
  config.optim.update(lr=1.0, warmup_steps=0)
  with config.optim.unlocked():
    config.optim.warmup_fraction = 0.1
    config.optim.schedule = "linear"
  schedule = optim.lr_schedule(config.optim, 100)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx(0.5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter", "prefix", "prompt"])
def test_peft_on_8_devices_gives_the_single_device_loss(method):
  """PEFT params shard like the weights they adapt; data x fsdp x tensor = 2 x 2 x 2 trains
  exactly as one device does: 3 real updates, the losses and the trained params."""
  def config():
    c = updating_config()
    c.peft.update(method=method, rank=4, init_rank=6, adapter_size=8, num_virtual_tokens=3,
                  targets="attn.*|mlp.*" if method in ("lora", "adalora") else "",
                  mask_every=1, warmup_fraction=0.0, final_fraction=0.0)
    c.num_steps = 3
    return c

  one = config()
  one.mesh.data = 1
  losses, params, _, initial = run_steps(one, jax.devices()[:1])
  reference = (losses, params, initial)
  eight = config()
  eight.mesh.update(data=2, fsdp=2, tensor=2)
  losses, params, state, _ = run_steps(eight, jax.devices())
  assert_same_training(losses, params, reference, flatten=trees.flat)
  if method == "lora":
    a = state.params["peft"]["transformer"]["h_0"]["mlp"]["fc"]["lora_b"]  # [r, mlp]
    assert a.addressable_shards[0].data.size == a.size // 2  # mlp over tensor


def test_logits_stay_sharded_over_batch_and_vocab():
  """Under the axis rules the [B, T, V] logits are split over the data axes and the
  vocabulary over tensor, never gathered whole onto every device."""
  config = tiny_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.make_task(config)
  from flax import linen as nn
  variables = nn.unbox(task.init(jax.random.key(0), config.seq_len))
  batch = random_batch(config)
  forward = lambda v, b: task.apply(v, b["inputs"], b["positions"], b["segment_ids"])  # noqa: E731
  logits = jax.jit(sharding.constrained(forward, mesh, config.axis_rules))(variables, batch)
  assert logits.shape == (8, 16, 512)
  assert logits.addressable_shards[0].data.shape == (2, 16, 256)  # B / (data x fsdp), V / tensor
  unconstrained = jax.jit(forward)(variables, batch)  # the same numbers either way
  np.testing.assert_allclose(np.asarray(logits), np.asarray(unconstrained), atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_all"])
def test_scan_over_layers_trains_exactly_like_the_layer_loop(reference, remat):
  """nn.scan over the blocks (params stacked on a leading "layers" axis) with each remat
  policy, on a 2 x 2 x 2 mesh, from the same weights: the losses of the plain model."""
  config = updating_config(scan_layers=True, remat=remat)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  losses, params, state, _ = run_steps(config, jax.devices(),
                                    hf_tensors=hf.to_hf_tensors(reference[2]["params"]))
  kernel = state.params["params"]["transformer"]["h"]["mlp"]["fc"]["kernel"]  # [layers, e, m]
  assert kernel.shape[0] == config.model.n_layer
  assert kernel.addressable_shards[0].data.size == kernel.size // 4  # fsdp x tensor
  # and the trained weights are the plain model's, layer by layer (in HF's per-layer names)
  assert_same_training(losses, params, reference, flatten=lambda p: hf.to_hf_tensors(p["params"]))


def _llama_config():
  from configs import llama
  config = llama.get_config("tiny")
  config.model.update(vocab_size=512, hidden_size=48, intermediate_size=64, head_dim=8,
                      num_attention_heads=6, num_key_value_heads=2, sliding_window=6,
                      layer_types=("sliding_attention", "full_attention"), qk_norm=True,
                      tie_word_embeddings=False)
  config.seq_len, config.batch_size, config.optim.warmup_steps = 16, 8, 0
  return config


def test_decoder_trains_alike_on_every_kind_of_mesh():
  """The Llama-style decoder (GQA with 2 KV heads, which tensor parallelism over 4 cannot
  split: replicated) on FSDP x tensor meshes: the single device's losses and params."""
  config = _llama_config()
  config.mesh.data = 1
  losses, params, _, initial = run_steps(config, jax.devices()[:1])
  for data, fsdp, tensor in ((1, 8, 1), (2, 1, 4), (2, 2, 2)):
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    got, got_params, _, _ = run_steps(config, jax.devices())
    assert_same_training(got, got_params, (losses, params, initial))


def test_decoder_weight_decay_skips_every_norm_and_the_embeddings():
  from flax import linen as nn
  config = _llama_config()
  task = tasks.make_task(config)
  params = nn.unbox(task.init(jax.random.key(0), config.seq_len))["params"]
  decayed = {k for k, v in trees.flat(optim.weight_decay_mask(params, config.optim)).items()
             if v}
  assert decayed == {k for k in trees.flat(params) if k[-1] == "kernel"}, decayed
