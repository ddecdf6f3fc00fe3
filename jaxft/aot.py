"""Ahead-of-time compilation of the train step: see an out-of-memory before paying for a pod.

`python -m jaxft.train --config ... --workdir ... --compile_only` builds the task, the mesh and
the shardings exactly as training does, lowers and compiles the train step for abstract
arguments (no parameter is initialised, no step runs), and prints XLA's memory analysis per
device: arguments (params, optimizer state, batch), outputs, temporaries (activations kept for
the backward pass, buffers), generated code, and the peak it implies, next to the device's
memory where the runtime reports it.
"""

import time

import jax
import numpy as np


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


def compile_report(step_fn, *abstract_args) -> dict:
  """Lowers and compiles `step_fn` (a jitted function) for the abstract arguments; returns
  timings and the per-device memory analysis in bytes."""
  t = time.perf_counter()
  lowered = step_fn.lower(*abstract_args)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  report = {"lower_s": lower_s, "compile_s": compile_s}
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes"):
      report[name.removesuffix("_size_in_bytes")] = int(getattr(mem, name, 0) or 0)
    # Donated arguments alias outputs: counted once.
    report["peak_estimate"] = (report["argument"] + report["output"] - report["alias"]
                               + report["temp"] + report["generated_code"])
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    report["device_bytes_limit"] = int(stats["bytes_limit"])
  return report


def format_report(report: dict, mesh) -> str:
  gib = 2.0 ** 30
  lines = [f"compiled the train step for mesh {dict(mesh.shape)} on {jax.device_count()} "
           f"{jax.devices()[0].platform} device(s): lowering {report['lower_s']:.1f} s, "
           f"compilation {report['compile_s']:.1f} s"]
  if "peak_estimate" in report:
    lines.append("per device: " + ", ".join(
        f"{k} {report[k] / gib:.3f} GiB" for k in ("argument", "output", "alias", "temp",
                                                    "generated_code", "peak_estimate")))
  else:
    lines.append("this backend reports no memory analysis")
  if "device_bytes_limit" in report:
    limit = report["device_bytes_limit"]
    verdict = "fits" if report.get("peak_estimate", 0) <= limit else "does NOT fit"
    lines.append(f"device memory {limit / gib:.2f} GiB: the step {verdict}")
  return "\n".join(lines)

