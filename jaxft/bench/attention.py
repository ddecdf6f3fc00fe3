"""Attention kernels on this backend: `python -m jaxft.bench.attention [--small]`.

For causal attention over packed rows (three segments per row), compares cuDNN flash attention
(config.model.attention_impl=cudnn) with xla: the max abs difference of the output and of the
gradients wrt q, k, v from a float32 xla reference, and the forward+backward step time, in
bfloat16 and float32 where each runs. Prints a table and, last, one JSON line. Where cuDNN
cannot run (no NVIDIA GPU, float32) its rows say why. --small: tiny shapes (seconds on CPU).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxft.models import attention

_SMALL = flags.DEFINE_bool("small", False, "tiny shapes: a smoke run (CPU)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed steps per measurement (median reported)")


def _shapes(small: bool):
  """(B, T, N, K, H): GPT-2 small's heads, and a GQA variant with 4 KV heads."""
  if small:
    return [(2, 128, 4, k, 16) for k in (4, 2)]
  return [(8, t, 12, k, 64) for t in (512, 2048) for k in (12, 4)]


def _inputs(b, t, n, k, h):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  kv = [jax.random.normal(key, (b, t, k, h)) for key in keys[1:3]]
  cot = jax.random.normal(keys[3], (b, t, n, h))
  bounds = np.asarray([t // 3, 2 * t // 3])[None] + 5 * np.arange(b)[:, None]  # [B, 2]
  segment_ids = 1 + (np.arange(t)[None, None] >= bounds[:, :, None]).sum(1)  # [B, T]: 3 docs
  return q, *kv, cot, jnp.asarray(segment_ids, jnp.int32)


def _step(impl: str, mask):
  """(q, k, v, cot) -> (out, (dq, dk, dv)): one forward + backward pass."""
  def attend(q, k, v):
    if impl == "cudnn":
      return attention.cudnn_attention(q, k, v, mask, causal=True)
    return attention.xla_attention(q, k, v, mask)

  def step(q, k, v, cot):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cot.astype(out.dtype))
  return jax.jit(step)


def _time_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _max_diff(got, want) -> float:
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def run(small: bool, repeats: int) -> list[dict]:
  rows = []
  for b, t, n, k, h in _shapes(small):
    q, kk, v, cot, segment_ids = _inputs(b, t, n, k, h)
    mask = attention.segment_mask(segment_ids, causal=True)
    want = _step("xla", mask)(q, kk, v, cot)  # the float32 reference
    for dtype in (jnp.bfloat16, jnp.float32):
      args = [x.astype(dtype) for x in (q, kk, v)] + [cot]
      for impl in ("xla", "cudnn"):
        row = {"B": b, "T": t, "N": n, "K": k, "H": h, "dtype": jnp.dtype(dtype).name,
               "impl": impl}
        fn = _step(impl, mask)
        try:
          out, grads = fn(*args)
        except ValueError as e:  # attention.py's refusal: no GPU, float32, a shape limit
          rows.append({**row, "skipped": str(e).split(" (attention_impl only")[0]})
          continue
        rows.append({**row, "max_abs_diff_out": _max_diff(out, want[0]),
                     "max_abs_diff_grad": _max_diff(grads, want[1]),
                     "fwd_bwd_ms": _time_ms(fn, args, repeats)})
  return rows


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"backend {jax.default_backend()} ({device.device_kind}); causal, 3 packed segments "
        "a row; differences from a float32 xla reference")
  rows = run(_SMALL.value, _REPEATS.value)
  print(f"{'B':>3} {'T':>5} {'N':>3} {'K':>3} {'H':>3} {'dtype':>8} {'impl':>6} "
        f"{'d(out)':>9} {'d(grad)':>9} {'ms':>9}")
  for r in rows:
    head = (f"{r['B']:>3} {r['T']:>5} {r['N']:>3} {r['K']:>3} {r['H']:>3} {r['dtype']:>8} "
            f"{r['impl']:>6} ")
    if "skipped" in r:
      print(head + "skipped: " + r["skipped"])
    else:
      print(head + f"{r['max_abs_diff_out']:9.2e} {r['max_abs_diff_grad']:9.2e} "
            f"{r['fwd_bwd_ms']:9.3f}")
  print(json.dumps({"backend": jax.default_backend(), "device": device.device_kind,
                    "rows": rows}))


if __name__ == "__main__":
  app.run(main)
