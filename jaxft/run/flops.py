"""Model FLOPs per token and MFU against a device's peak (bf16 dense on accelerators; on CPU, a
matmul ceiling measured at start-up)."""

import functools
import os
import time

import jax
import jax.numpy as jnp


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N (non-embedding params + the LM-head matmul) plus attention
  6·L·T·D (the 12·L·D·T score/value matmuls, halved because causal masking skips half).

  For BERT (bidirectional: the full 12·L·T·D) the head is left out: classifier heads are tiny
  and the MLM head only scores the masked positions."""
  if hasattr(model_cfg, "hidden_size"):
    d, n_layer, ff = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.intermediate_size
    return 6.0 * n_layer * (4 * d * d + 2 * d * ff) + 12.0 * n_layer * seq_len * d
  d, n_layer, vocab = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size
  block_params = n_layer * (12 * d * d + 13 * d)  # qkv+out (4d²), mlp (8d²), biases, norms
  return 6.0 * (block_params + d * vocab) + 6.0 * n_layer * seq_len * d


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


