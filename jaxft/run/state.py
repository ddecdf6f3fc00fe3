"""TrainState and its sharded creation: eval_shape -> logical specs -> shardings -> jit(init).

A model's variables split in two (jaxft/peft): the trainable part lives in TrainState.params
next to its optimizer state; the frozen part (a PEFT run's base model; empty in full
fine-tuning) is passed to the step beside the state, never differentiated, never updated and
never written to checkpoints (it is rebuilt from config.init_from on resume).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxft import trees
from jaxft.parallel import distributed, sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any  # the trainable variables: {"params": {...}, "peft": {...}} (a subset of leaves)
  opt_state: Any
  # Base key. Per-step keys are fold_in(rng, step), so a restart replays the same randomness.
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every variable of a task's model: abstract shape, sharding, and whether it trains."""

  abstract: dict
  shardings: dict
  trainable: dict  # bool per leaf

  def split(self, tree) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a tree shaped like the variables."""
    return trees.split(tree, self.trainable)

  @property
  def has_frozen(self) -> bool:
    return bool(self.split(self.abstract)[1])


def layout(task, seq_len: int, mesh, axis_rules) -> Layout:
  boxed = jax.eval_shape(lambda: task.init(jax.random.key(0), seq_len))
  abstract = nn.unbox(boxed)
  return Layout(abstract, sharding.param_shardings(boxed, mesh, axis_rules),
                task.peft.trainable_mask(abstract, task.trainable_head))


def _param_sharding_lookup(param_sh: dict) -> dict[tuple, Any]:
  """Param path -> sharding, also keyed without the collection (AdaLoRA's statistics mirror the
  "peft" subtree below it)."""
  out = {}
  for path, sh in trees.flat(param_sh).items():
    out[path] = sh
    out.setdefault(path[1:], sh)
  return out


def state_shardings(lay: Layout, tx, mesh) -> TrainState:
  """The NamedSharding of every TrainState leaf. An optimizer-state leaf whose key path ends in
  a trainable param's path (Adam's mu and nu, ...) and has its shape shares its sharding;
  counters and the like are replicated."""
  param_sh, _ = lay.split(lay.shardings)
  abstract_params, _ = lay.split(lay.abstract)
  shapes = {k: v.shape for k, v in trees.flat(abstract_params).items()}
  shapes.update({k[1:]: v for k, v in list(shapes.items())})
  lookup = _param_sharding_lookup(param_sh)
  replicated = sharding.replicated(mesh)

  def for_leaf(path, leaf):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in lookup and shapes.get(suffix) == leaf.shape:
        return lookup[suffix]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(for_leaf, jax.eval_shape(tx.init, abstract_params))
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def random_variables(task, seq_len: int, seed: int, lay: Layout) -> dict:
  """The seed's random initialisation of every variable, created in its shardings."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  return jax.jit(lambda k: nn.unbox(task.init(k, seq_len)), out_shardings=lay.shardings)(init_key)


def create_train_state(task, tx, *, seq_len: int, seed: int, mesh, axis_rules,
                       variables=None) -> tuple[TrainState, dict, TrainState, Layout]:
  """(state, frozen variables, state shardings, layout), all created in their shardings (no
  full copy on one device). `variables` (e.g. imported from Hugging Face) replace the random
  initialisation."""
  lay = layout(task, seq_len, mesh, axis_rules)
  shardings = state_shardings(lay, tx, mesh)
  _, train_key = jax.random.split(jax.random.key(seed))
  if variables is None:
    variables = random_variables(task, seq_len, seed, lay)
  else:
    variables = jax.device_put(variables, lay.shardings)
  trainable, frozen = lay.split(variables)

  def init(params):
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key))

  state = jax.jit(init, out_shardings=shardings)(trainable)
  return state, frozen, shardings, lay


def abstract_state(lay: Layout, tx, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target for Orbax on any mesh."""
  trainable, _ = lay.split(lay.abstract)

  def init(params):  # traced: tx.init may compute from the params (a params EMA copies them)
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(0)))

  shapes = jax.eval_shape(init, trainable)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def fingerprint(frozen) -> float:
  """A cheap checksum of the frozen variables (their float64 sum of |x|): a resumed PEFT run
  checks that config.init_from still holds the base model it was trained on."""
  leaves = jax.tree.leaves(frozen)
  if not leaves:
    return 0.0
  total = jax.jit(lambda xs: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in xs))(leaves)
  return float(distributed.to_host(total))
