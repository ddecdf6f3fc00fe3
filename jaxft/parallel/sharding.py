"""Device mesh and logical-axis sharding: the only module that talks to jax.sharding."""

import contextvars
import functools
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# config.mesh.dcn_<axis>: how many slices (over the data-center network) each axis spans.
DCN_FIELDS = tuple(f"dcn_{a}" for a in MESH_AXES)


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
  """config.mesh.dcn_* (1 where a config predates them), checked: positive integers."""
  shape = []
  for field in DCN_FIELDS:
    value = mesh_cfg.get(field, 1)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"config.mesh.{field}={value!r}: the dcn_* sizes are the number of "
                       "slices an axis spans and must be positive integers (1 = within one "
                       "slice); -1 ('the rest') is only for data/fsdp/tensor")
    shape.append(int(value))
  return tuple(shape)


def _resolve_ici(mesh_cfg, num_devices: int, slices: int) -> tuple[int, ...]:
  """In-slice sizes from config.mesh.data/fsdp/tensor; one may be -1 (= the rest of a slice)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  where = (f"the {num_devices} devices" if slices == 1 else
           f"the {num_devices} devices of one slice ({num_devices * slices} devices / {slices} "
           "slices from config.mesh.dcn_*)")
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, with "
                     "at most one -1 (meaning 'the remaining devices')")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: the fixed axes multiply to {fixed}, which does not divide "
                       f"{where}; change config.mesh")
    sizes[MESH_AXES.index(free[0])] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    if slices == 1:
      raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                       f"devices but {num_devices} are available; set one axis to -1")
    raise ValueError(f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices per slice but a slice has {num_devices} ({where}); data/fsdp/"
                     "tensor describe one slice: set one of them to -1")
  return tuple(sizes)


def resolve_hybrid_shape(mesh_cfg, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici, dcn) sizes per mesh axis: the layout inside one slice and across slices.

  The total size of axis X is ici[X] * dcn[X]; a slice holds num_devices / prod(dcn) devices."""
  dcn = dcn_shape(mesh_cfg)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise ValueError(f"config.mesh.dcn_*={dict(zip(DCN_FIELDS, dcn))} span {slices} slices, "
                     f"which does not divide the {num_devices} devices; set dcn_data * dcn_fsdp "
                     "* dcn_tensor to the number of slices (1 for a single slice)")
  return _resolve_ici(mesh_cfg, num_devices // slices, slices), dcn


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Total mesh sizes per axis (in-slice size x slices) from config.mesh; one of data/fsdp/
  tensor may be -1 (= whatever the others leave of a slice)."""
  ici, dcn = resolve_hybrid_shape(mesh_cfg, num_devices)
  return tuple(i * d for i, d in zip(ici, dcn))


def _slices(devices: Sequence[jax.Device], n_slices: int) -> tuple[str, list[list]]:
  """The devices grouped into slices: by `slice_index` on TPU (and wherever it tells slices
  apart); otherwise by process, consecutive processes merged when there are more processes than
  slices (one process per GPU: SLURM numbers them node by node, so a slice is a node).
  Multi-process CPU devices carry a slice_index that is 0 for all of them, so its mere presence
  does not decide."""
  by_slice = hasattr(devices[0], "slice_index") and (
      devices[0].platform == "tpu" or len({d.slice_index for d in devices}) > 1)
  attr = "slice_index" if by_slice else "process_index"
  groups: dict = {}
  for d in devices:
    groups.setdefault(getattr(d, attr), []).append(d)
  ordered = [groups[k] for k in sorted(groups)]
  if attr == "process_index" and len(ordered) > n_slices and len(ordered) % n_slices == 0:
    per = len(ordered) // n_slices
    ordered = [sum(ordered[i:i + per], []) for i in range(0, len(ordered), per)]
  return attr, ordered


def _hybrid_array(ici: Sequence[int], dcn: Sequence[int], slices: list[list]) -> np.ndarray:
  """Each slice laid out as an ici-shaped block (mesh_utils' own in-slice layout), the blocks
  tiled in the dcn shape: what create_hybrid_device_mesh builds, for any grouping."""
  blocks = [mesh_utils.create_device_mesh(tuple(ici), devices=s, allow_split_physical_axes=True)
            for s in slices]
  grid = np.empty(tuple(dcn), dtype=object)
  for index, block in zip(np.ndindex(*dcn), blocks):
    grid[index] = block
  return np.block(grid.tolist())


def hybrid_devices(ici: Sequence[int], dcn: Sequence[int],
                   devices: Sequence[jax.Device]) -> np.ndarray | None:
  """The [data, fsdp, tensor] array of devices for a multi-slice mesh (prod(dcn) > 1): every
  slice fills one contiguous ici-shaped block, so only the dcn part of an axis crosses the
  data-center network. None for a single slice (jax.make_mesh lays that out)."""
  n_slices = math.prod(dcn)
  attr, slices = _slices(devices, n_slices)
  if n_slices == 1:
    if attr == "slice_index" and len(slices) > 1:
      log.warning("the %d devices span %d TPU slices but config.mesh.dcn_* are all 1: set "
                  "config.mesh.dcn_data=%d (data parallelism across slices) so that only the "
                  "data axis crosses the data-center network", len(devices), len(slices),
                  len(slices))
    return None
  unit = ("slices" if attr == "slice_index" else
          "slices of processes (on CPU/GPU a slice is a process, or as many consecutive "
          "processes as divide them evenly)")
  if len(slices) != n_slices:
    raise ValueError(f"config.mesh.dcn_*={dict(zip(DCN_FIELDS, dcn))} span {n_slices} slices "
                     f"but the {len(devices)} devices form {len(slices)} {unit}; make "
                     f"dcn_data * dcn_fsdp * dcn_tensor equal {len(slices)} (all 1 for a single "
                     "slice)")
  sizes = [len(s) for s in slices]
  if len(set(sizes)) > 1:
    raise ValueError(f"config.mesh.dcn_*: a multi-slice mesh needs equal slices, but the {unit} "
                     f"hold {sizes} devices; run the same number of devices in each")
  if attr == "slice_index":  # TPU: jax knows each slice's physical topology
    return mesh_utils.create_hybrid_device_mesh(tuple(ici), tuple(dcn), devices)
  return _hybrid_array(ici, dcn, slices)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The [data, fsdp, tensor] mesh of config.mesh: data/fsdp/tensor inside a slice (ICI) times
  dcn_data/dcn_fsdp/dcn_tensor across slices (DCN)."""
  devices = list(devices if devices is not None else jax.devices())
  ici, dcn = resolve_hybrid_shape(mesh_cfg, len(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  log.info("mesh %s over %d slice(s) of %d devices", ", ".join(
      f"{a}={s} (ici {i} x dcn {d})" for a, s, i, d in zip(MESH_AXES, shape, ici, dcn)),
      math.prod(dcn), len(devices) // math.prod(dcn))
  # Auto axes: GSPMD propagates shardings from the logical-axis annotations.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  array = hybrid_devices(ici, dcn, devices)
  if array is None:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  return Mesh(array, MESH_AXES, axis_types=axis_types)


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
  check_process_rows(mesh, axis_rules, batch_size)


def check_process_rows(mesh: Mesh, axis_rules, global_batch_size: int) -> None:
  """The input pipeline gives process p rows [p * n, (p + 1) * n) of every global batch
  (n = batch / processes, data/pipeline.py process_rows); the batch sharding must put exactly
  those rows on p's devices, or rows would be trained twice and others never. True for every
  single-slice mesh and for dcn_data; not when a dcn_fsdp / dcn_tensor split interleaves the
  processes' rows."""
  processes = jax.process_count()
  if processes == 1:
    return
  n, p = global_batch_size // processes, jax.process_index()
  index_map = batch_sharding(mesh, axis_rules).addressable_devices_indices_map(
      (global_batch_size, 1))
  held = set()
  for index in index_map.values():
    held.update(range(*index[0].indices(global_batch_size)))
  if held != set(range(p * n, (p + 1) * n)):
    raise ValueError(
        f"config.mesh={dict(mesh.shape)}: process {p}'s devices hold batch rows "
        f"{sorted(held)[:8]}... but the input pipeline feeds each process one contiguous block "
        f"(rows {p * n}..{(p + 1) * n - 1} here); split the slices over the data axis "
        "(config.mesh.dcn_data) or, with config.mesh.dcn_fsdp, set config.mesh.data=1")


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


def active():
  """(mesh, axis rules) of the enclosing `constrained` function, or None outside one (kernels
  that need the mesh itself, e.g. shard_map around splash attention, read it here)."""
  return _ACTIVE.get()


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
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _ACTIVE.set((mesh, rules(axis_rules)))
    try:
      return fn(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)

  return wrapped
