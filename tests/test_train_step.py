"""The sharded train step: mesh-shape invariance, gradient accumulation, optimizer masks."""

import itertools

import jax
import numpy as np
import pytest

from jaxft import hf, tasks
from jaxft.parallel import sharding
from jaxft.run import optim, steps
from jaxft.run import state as state_lib
from tests.helpers import random_batch, tiny_config


def run_steps(config, devices, n_steps=2, batch_seed=0, hf_tensors=None):
  """Losses of n_steps train steps on one fixed batch, and the final params on the host.
  `hf_tensors` (an HF state dict) replace the random initial params."""
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
  losses = []
  for _ in range(n_steps):
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  return np.array(losses), jax.device_get(state.params), state


def _factorisations(n=8):
  for d, f in itertools.product([1, 2, 4, 8], repeat=2):
    if n % (d * f) == 0:
      yield d, f, n // (d * f)


@pytest.fixture(scope="module")
def reference():
  config = tiny_config()
  config.mesh.data = 1
  return run_steps(config, jax.devices()[:1])


@pytest.mark.parametrize("data,fsdp,tensor", list(_factorisations()))
def test_every_mesh_shape_gives_the_single_device_loss(reference, data, fsdp, tensor):
  config = tiny_config()
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  losses, params, state = run_steps(config, jax.devices())
  np.testing.assert_allclose(losses, reference[0], rtol=0, atol=1e-5)
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


def _gradient(config):
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.make_task(config)
  tx = _record_gradient()
  state, frozen, shardings, _ = state_lib.create_train_state(
      task, tx, seq_len=config.seq_len, seed=0, mesh=mesh, axis_rules=config.axis_rules)
  batch_sh = sharding.batch_sharding(mesh, config.axis_rules)
  step = jax.jit(steps.make_train_step(task.loss, tx, lambda s: 1.0, config.grad_accum_steps),
                 in_shardings=(shardings, None, batch_sh), out_shardings=(shardings, None))
  after, metrics = step(state, frozen, sharding.global_batch(random_batch(config, 1), batch_sh))
  return float(metrics["loss"]), jax.device_get(after.opt_state)


def test_grad_accumulation_equals_full_batch():
  full_cfg = tiny_config()
  acc_cfg = tiny_config()
  acc_cfg.grad_accum_steps = 4
  full_loss, full_grads = _gradient(full_cfg)
  acc_loss, acc_grads = _gradient(acc_cfg)
  assert acc_loss == pytest.approx(full_loss, rel=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(acc_grads):
    b = _at(full_grads, path)
    # Relative to the tensor's norm: elementwise rtol is meaningless for entries near zero.
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b) + 1e-12, path


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


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
  exactly as one device does."""
  def config():
    c = tiny_config()
    c.peft.update(method=method, rank=4, init_rank=6, adapter_size=8, num_virtual_tokens=3,
                  targets="attn.*|mlp.*" if method in ("lora", "adalora") else "",
                  mask_every=1, warmup_fraction=0.0, final_fraction=0.0)
    c.num_steps = 3
    return c

  one = config()
  one.mesh.data = 1
  reference, _, _ = run_steps(one, jax.devices()[:1], n_steps=3)
  eight = config()
  eight.mesh.update(data=2, fsdp=2, tensor=2)
  losses, params, state = run_steps(eight, jax.devices(), n_steps=3)
  np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
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
  config = tiny_config(scan_layers=True, remat=remat)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  plain = tiny_config()
  plain.mesh.data = 1
  task = tasks.make_task(plain)
  first = state_lib.random_variables(
      task, plain.seq_len, plain.seed,
      state_lib.layout(task, plain.seq_len, sharding.make_mesh(plain.mesh, jax.devices()[:1]),
                       plain.axis_rules))
  losses, params, state = run_steps(config, jax.devices(),
                                    hf_tensors=hf.to_hf_tensors(first["params"]))
  np.testing.assert_allclose(losses, reference[0], rtol=0, atol=1e-5)
  kernel = state.params["params"]["transformer"]["h"]["mlp"]["fc"]["kernel"]  # [layers, e, m]
  assert kernel.shape[0] == config.model.n_layer
  assert kernel.addressable_shards[0].data.size == kernel.size // 4  # fsdp x tensor
  # and the trained weights are the plain model's, layer by layer
  trained = hf.to_hf_tensors(params["params"])
  for name, tensor in hf.to_hf_tensors(reference[1]["params"]).items():
    np.testing.assert_allclose(trained[name], tensor, atol=1e-5, rtol=0, err_msg=name)
