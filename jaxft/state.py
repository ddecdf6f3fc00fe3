"""TrainState and its sharded creation: eval_shape -> logical specs -> shardings -> jit(init)."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from jaxft import sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  # Base key. Per-step keys are fold_in(rng, step), so a restart replays the same randomness.
  rng: jax.Array


def _param_shardings(task, seq_len, mesh, axis_rules):
  boxed = jax.eval_shape(lambda: task.init(jax.random.key(0), seq_len))
  return sharding.param_shardings(boxed, mesh, axis_rules)["params"]


def state_shardings(task, tx, seq_len, mesh, axis_rules) -> TrainState:
  """The NamedSharding of every TrainState leaf; optimizer moments follow their params."""
  param_sh = _param_shardings(task, seq_len, mesh, axis_rules)
  abstract_params = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0),
                                                              seq_len))["params"])
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def create_train_state(task, tx, *, seq_len: int, seed: int, mesh, axis_rules,
                       params=None) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings (no full copy on one device).

  `params`, if given (e.g. imported from Hugging Face), replaces the random initialisation.
  """
  shardings = state_shardings(task, tx, seq_len, mesh, axis_rules)
  init_key, train_key = jax.random.split(jax.random.key(seed))

  def init(key, given_params):
    p = given_params if given_params is not None else nn.unbox(task.init(key, seq_len))["params"]
    return TrainState(step=jnp.array(0, jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(train_key))

  if params is not None:
    params = jax.device_put(params, shardings.params)
  state = jax.jit(init, out_shardings=shardings)(init_key, params)
  return state, shardings


def abstract_state(task, tx, *, seq_len: int, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for Orbax on any mesh."""
  def init():
    p = nn.unbox(task.init(jax.random.key(0), seq_len))["params"]
    return TrainState(step=jnp.array(0, jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(jax.random.key(0)))

  shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
