"""Device mesh and logical-axis sharding: the only module that talks to jax.sharding."""

import contextvars
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Mesh sizes from config.mesh; one axis may be -1 (= whatever the others leave)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, with "
                     "at most one -1 (meaning 'the remaining devices')")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: the fixed axes multiply to {fixed}, which does not divide "
                       f"the {num_devices} devices; change config.mesh")
    sizes[MESH_AXES.index(free[0])] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {num_devices} are available; set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  # Auto axes: GSPMD propagates shardings from the logical-axis annotations.
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules(axis_rules) -> tuple:
  """config.axis_rules (ConfigDict turns tuples into lists) -> flax's rule tuples."""
  out = []
  for name, target in axis_rules:
    out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
  return tuple(out)


def _fit_to_shape(spec: PartitionSpec, shape, mesh: Mesh, name: str) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (e.g. GPT-2's 50257-token vocab over
  tensor=2): that dimension is replicated instead of failing at device_put."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if names and dim % math.prod(mesh.shape[a] for a in names):
      log.info("%s: dimension %d is not divisible by mesh axes %s; replicating it", name, dim,
               names)
      axes = None
    fitted.append(axes)
  return PartitionSpec(*fitted)


def param_shardings(boxed_abstract, mesh: Mesh, axis_rules):
  """Abstract boxed variables (from eval_shape of init) -> a NamedSharding per unboxed leaf."""
  logical = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(logical, rules(axis_rules))
  shapes = nn.unbox(boxed_abstract)

  def fit(path, spec, shape):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return NamedSharding(mesh, _fit_to_shape(spec, shape.shape, mesh, name))

  return jax.tree_util.tree_map_with_path(
      fit, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  """Sharding of a [B, T] batch array: rows over the data-parallel axes."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules(axis_rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, axis_rules) -> int:
  """How many ways the batch dimension is split."""
  spec = batch_sharding(mesh, axis_rules).spec[0]
  axes = (spec,) if isinstance(spec, str) else (spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_divisible(batch_size: int, grad_accum_steps: int, mesh: Mesh, axis_rules):
  dp = data_parallel_size(mesh, axis_rules)
  if grad_accum_steps < 1 or batch_size % grad_accum_steps:
    raise ValueError(f"config.batch_size={batch_size} must be divisible by "
                     f"config.grad_accum_steps={grad_accum_steps}")
  micro = batch_size // grad_accum_steps
  if micro % dp:
    raise ValueError(
        f"config.batch_size={batch_size} (micro-batch {micro} with grad_accum_steps="
        f"{grad_accum_steps}) is not divisible by the data-parallel mesh size {dp} "
        f"(mesh {dict(mesh.shape)}); use a batch size that is a multiple of {dp * grad_accum_steps}"
        " or change config.mesh")


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows -> global jax.Arrays sharded over the data axes (multi-host safe).

  `sharding` is the [B, T] batch sharding; arrays of other ranks ([B] labels, [B, K]
  positions, [B, T, 2] offsets) get the same row split and replicate their other axes."""
  rows = sharding.spec[0] if len(sharding.spec) else None
  out = {}
  for k, v in local_batch.items():
    sh = NamedSharding(sharding.mesh, PartitionSpec(rows, *([None] * (v.ndim - 1))))
    out[k] = jax.make_array_from_process_local_data(sh, v)
  return out


# The mesh and rules a traced function runs under (set by `constrained`). Passed to flax
# explicitly rather than as a global mesh: a global mesh would also constrain flax's own
# shape checks of DenseGeneral kernels (flattened to 2-D there) and fail.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxft_mesh_and_rules", default=None)


def constrain(x, logical_axes: tuple):
  """nn.with_logical_constraint under the mesh and rules of the enclosing `constrained`
  function; the identity outside one (e.g. a model applied on one device)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, axis_rules = active
  return nn.with_logical_constraint(x, logical_axes, rules=axis_rules, mesh=mesh)


def constrained(fn, mesh: Mesh, axis_rules):
  """`fn` traced with the models' activation constraints in force (hidden states over batch,
  logits over batch and vocabulary, ...) instead of leaving GSPMD to guess from the params."""
  import functools

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _ACTIVE.set((mesh, rules(axis_rules)))
    try:
      return fn(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)

  return wrapped
