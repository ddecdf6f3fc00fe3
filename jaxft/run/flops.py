"""A device's peak FLOP/s for MFU (bf16 dense on accelerators; on CPU, a matmul ceiling measured
at start-up) and the throughput figures every log and bench reports. Model FLOPs per token are
the task's (Task.flops_per_token, counted as in jaxft/models/flops.py)."""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp


def peak_flops_per_device() -> tuple[float, str]:
  """Peak dense FLOP/s of one local device and where the number comes from."""
  kind = jax.devices()[0].device_kind.lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5 lite": 197e12, "v5e": 197e12,
           "v4": 275e12, "v5p": 459e12, "v6": 918e12, "l4": 121e12}
  for key, flops in table.items():
    if key in kind:
      return flops, f"{kind} bf16 dense peak"
  if jax.devices()[0].platform != "cpu":
    return float("nan"), f"{kind}: peak unknown to jaxft.run.flops"
  # CPU devices of one process share the host's cores: each gets its share of the host peak.
  share = jax.local_device_count()
  if os.environ.get("JAXFT_CPU_PEAK_FLOPS"):
    return (float(os.environ["JAXFT_CPU_PEAK_FLOPS"]) / share,
            "host CPU peak from JAXFT_CPU_PEAK_FLOPS")
  return cpu_matmul_ceiling() / share, "measured host CPU f32 matmul ceiling"


@functools.cache
def cpu_matmul_ceiling(n: int = 2048, repeats: int = 4) -> float:
  """FLOP/s of the fastest of `repeats` jitted f32 [n, n] @ [n, n] on this host's CPU devices
  (~1 s). CPUs publish no single peak (cores, vector units and clocks vary), so MFU on CPU is
  measured against what XLA's own matmul reaches here."""
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def throughput(tokens_per_s: float, flops_per_token: float, peak_per_device: float,
               devices: int) -> dict[str, float]:
  """tokens/s of the whole step -> the figures logs and bench JSON carry: per-device tokens/s,
  model TFLOP/s per device and MFU (absent where the device's peak is unknown)."""
  per_device = tokens_per_s / devices
  out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
         "model_tflops_per_s_per_device": per_device * flops_per_token / 1e12}
  if math.isfinite(peak_per_device):
    out["mfu"] = per_device * flops_per_token / peak_per_device
  return out
