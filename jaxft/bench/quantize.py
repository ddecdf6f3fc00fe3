"""fp32 vs int8 vs int4 of one trained run, in one process: weight bytes, the task's metric and
CPU serving speed (docs/quantization.md).

    nice python -m jaxft.bench.quantize --workdir runs/bbc   # test accuracy, predict speed
    nice python -m jaxft.bench.quantize --workdir runs/gpt2  # validation perplexity, generate

Each quantised variant is written with jaxft.quant and opened through jaxft.run.loader.open_run
(what python -m jaxft.quantize and the commands do). Speed, compiled, best of --repeats passes
with the variants interleaved: seconds of one inference pass over --split (what predict and
evaluate do: batches of config.eval_batch_size rows), and for a causal LM new tokens/s of greedy
generation (--gen_batch prompts of 16 tokens, --gen_tokens new ones) and the milliseconds of one
jitted decoding step of 8 rows (a server's continuous-batching step, outside any loop).
"""

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxft import quant
from jaxft.models import generation
from jaxft.run import evaluation, loader
from jaxft.run import workdir as workdir_lib


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "trained run to measure")
  flags.DEFINE_string("split", None, "split scored (default: test for labelled tasks, else "
                      "validation)")
  flags.DEFINE_integer("group_size", 128, "int4 group size")
  flags.DEFINE_integer("gen_batch", 1, "causal LM: prompts generated at once")
  flags.DEFINE_integer("gen_tokens", 64, "causal LM: new tokens per prompt")
  flags.DEFINE_integer("repeats", 3, "timed passes per variant (the best counts)")
  flags.DEFINE_string("json_out", None, "also write the table as JSON here")


def _timed(f) -> float:
  start = time.perf_counter()
  f()
  return time.perf_counter() - start


def _decode_step(run, slots: int = 8, length: int = 128):
  """One jitted single-token decoding step of `slots` rows against a KV cache of `length`
  (what a server's continuous-batching step computes; the cache is not advanced)."""
  model = run.model
  dummy = jnp.zeros((slots, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, decode=True))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
  token = jnp.ones((slots, 1), jnp.int32)
  step = jax.jit(lambda v, c: model.apply({**v, "cache": c}, token, token * 0, token,
                                          decode=True, mutable=["cache"])[0])
  return lambda: step(run.variables, cache).block_until_ready()


def _quantized(fp, bits: int, group_size: int, tmp: str):
  """The run quantised, saved and opened again (python -m jaxft.quantize's path)."""
  out = os.path.join(tmp, f"int{bits}")
  config, variables = quant.quantize_run(fp, bits, group_size)
  os.makedirs(out)
  quant.save_weights(out, variables)
  workdir_lib.save_config(out, config)
  if fp.labels is not None:
    workdir_lib.save_labels(out, fp.labels)
  return loader.open_run(out)


def measure(workdir: str, split: str | None = None, group_size: int = 128, gen_batch: int = 1,
            gen_tokens: int = 64, repeats: int = 3) -> list[dict]:
  """One row per variant (fp32, int8, int4). Speeds are the best of `repeats` timed passes,
  the variants interleaved, so that load from other processes hits all of them alike."""
  fp = loader.open_run(workdir)
  split = split or ("validation" if fp.task.generative else "test")
  rows, work = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for bits in (None, 8, 4):
      run = fp if bits is None else _quantized(fp, bits, group_size, tmp)
      fn = evaluation.single_device_eval(run.task)
      metrics, _ = evaluation.evaluate(run.task, fn, run.task.eval_batches(split),
                                       run.variables, split=split)  # compiles, too
      params = fp.task.peft.merge(fp.variables) if bits is None else run.variables
      rows.append({"weights": "fp32" if bits is None else f"int{bits}",
                   "weight_bytes": quant.weight_bytes(params),
                   **{f"{split}/{k}": float(v) for k, v in metrics.items()}})
      passes = {"eval_pass_s": lambda r=run, f=fn: evaluation.run_batches(
          f, r.task.eval_batches(split), r.variables)}
      if fp.task.generative:
        prompts = np.random.default_rng(0).integers(
            0, fp.task.model.cfg.vocab_size, (gen_batch, 16)).tolist()
        passes["generate_s"] = lambda r=run, p=prompts: generation.generate(
            r.model, r.variables, p, max_new_tokens=gen_tokens, temperature=0.0, eos_id=-1)
        passes["generate_s"]()  # compile
        passes["decode_step_s"] = _decode_step(run)
        passes["decode_step_s"]()
      work.append(passes)
    for _ in range(repeats):
      for row, passes in zip(rows, work):
        for name, f in passes.items():
          row[name] = min(row.get(name, float("inf")), _timed(f))
  for row in rows:
    row["bytes_vs_fp32"] = row["weight_bytes"] / rows[0]["weight_bytes"]
    if "generate_s" in row:
      row["generate_tokens_per_s"] = gen_batch * gen_tokens / row["generate_s"]
      row["decode_step_ms"] = 1e3 * row.pop("decode_step_s")
    print(json.dumps(row), flush=True)
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("give --workdir")
  rows = measure(f.workdir, f.split, f.group_size, f.gen_batch, f.gen_tokens, f.repeats)
  for row in rows:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()))
  if f.json_out:
    with open(f.json_out, "w") as out:
      json.dump(rows, out, indent=2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
