"""Ahead-of-time compilation of the train step: see an out-of-memory before paying for a pod.

`python -m jaxft.train --config ... --workdir ... --compile_only` builds the task, the mesh and
the shardings exactly as training does, lowers and compiles the train step for abstract
arguments (no parameter is initialised, no step runs), and prints XLA's memory analysis per
device: arguments (params, optimizer state, batch), outputs, temporaries (activations kept for
the backward pass, buffers), generated code, and the peak it implies, next to the device's
memory where the runtime reports it.
"""

import importlib.util
import os
import time

import jax
import numpy as np
from jax.experimental import topologies


def abstract_batch(local_batch: dict, batch_sh) -> dict:
  """ShapeDtypeStructs of the global batch built from this process's rows of one batch."""
  rows = batch_sh.spec[0] if len(batch_sh.spec) else None
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    spec = jax.sharding.PartitionSpec(rows, *([None] * (v.ndim - 1)))
    shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    out[k] = jax.ShapeDtypeStruct(shape, v.dtype,
                                  sharding=jax.sharding.NamedSharding(batch_sh.mesh, spec))
  return out


def abstract_tree(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree,
                      shardings)


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def compile_report(step_fn, *abstract_args, local: bool = True) -> dict:
  """Lowers and compiles `step_fn` (a jitted function) for the abstract arguments; returns
  timings and the per-device memory analysis in bytes (with the device's capacity when
  `local`: compiled for this host's devices)."""
  t = time.perf_counter()
  lowered = step_fn.lower(*abstract_args)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  report = {"lower_s": lower_s, "compile_s": compile_s,
            "train_state": bytes_per_device(abstract_args[0])}
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes"):
      report[name.removesuffix("_size_in_bytes")] = int(getattr(mem, name, 0) or 0)
    # Donated arguments alias outputs: counted once.
    report["peak_estimate"] = (report["argument"] + report["output"] - report["alias"]
                               + report["temp"] + report["generated_code"])
  stats = (jax.local_devices()[0].memory_stats() or {}) if local else {}
  if "bytes_limit" in stats:  # the devices compiled for are this host's: their capacity
    report["device_bytes_limit"] = int(stats["bytes_limit"])
  return report


def format_report(report: dict, mesh) -> str:
  gib = 2.0 ** 30
  device = mesh.devices.flat[0]
  lines = [f"compiled the train step for mesh {dict(mesh.shape)} of {mesh.devices.size} "
           f"{device.device_kind} device(s): lowering {report['lower_s']:.1f} s, "
           f"compilation {report['compile_s']:.1f} s"]
  lines.append(f"train state (params + optimizer state) per device: "
               f"{report['train_state'] / gib:.3f} GiB")
  if "peak_estimate" in report:
    lines.append("XLA memory analysis per device: " + ", ".join(
        f"{k} {report[k] / gib:.3f} GiB" for k in ("argument", "output", "alias", "temp",
                                                    "generated_code", "peak_estimate")))
  else:
    lines.append("this backend reports no memory analysis")
  if "device_bytes_limit" in report:
    limit = report["device_bytes_limit"]
    verdict = "fits" if report.get("peak_estimate", 0) <= limit else "does NOT fit"
    lines.append(f"device memory {limit / gib:.2f} GiB: the step {verdict}")
  return "\n".join(lines)



# TPU generations: (chips a name's number counts per chip, whether the torus is 3-D).
_GENERATIONS = {"v4": (2, True), "v5p": (2, True), "v5e": (1, False), "v6e": (1, False)}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GRIDS_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
             128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}


def topology_name(name: str) -> str:
  """"v5e-16" (or gcloud's "v5litepod-16") -> "v5e:4x4"; "v4-32" (TensorCores) -> "v4:2x2x4";
  a "gen:AxB[xC]" name is kept."""
  if ":" in name:
    return name
  gen, _, size = name.replace("v5litepod", "v5e").partition("-")
  if gen not in _GENERATIONS or not size.isdigit():
    raise ValueError(f"--topology={name!r} is not a TPU slice name jaxft knows; use "
                     f"{', '.join(g + '-N' for g in _GENERATIONS)} (e.g. v5e-16, v4-32) or a "
                     "topology like v5e:4x4")
  per_chip, cube = _GENERATIONS[gen]
  chips = int(size) // per_chip
  grid = (_GRIDS_3D if cube else _GRIDS_2D).get(chips)
  if grid is None:
    raise ValueError(f"--topology={name!r}: {chips} chips is not a {gen} slice shape jaxft "
                     "knows; give the topology itself, e.g. --topology={gen}:2x2x4")
  return f"{gen}:{grid}"


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` TPU slices of this topology, described (not attached): a
  mesh over them compiles for it (multi-slice: config.mesh.dcn_*)."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology={name!r} compiles for TPU from this host, which needs the TPU "
                     "compiler: pip install libtpu (it needs no TPU to compile)")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no slice to discover here
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name(name),
                                           num_slices=num_slices).devices)
