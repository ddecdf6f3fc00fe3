"""Times the train step of any config: compile time, step time, tokens/s, MFU, peak memory.

    python -m jaxft.bench --config configs/gpt2.py:cpu-bench [--config.FIELD=V ...] \
        [--steps 10] [--rounds 3] [--torch compile]

Batches are random tokens in the batch contract (one segment per row), so the figures are the
step's alone, not the data pipeline's. The step is the one `jaxft.train` runs (same sharded
state, same jit with donation). `--torch eager|compile` also trains transformers'
GPT2LMHeadModel (PyTorch, AdamW, same shape and batch) in the same process, alternating rounds
with jaxft so both see the same machine load, and reports the ratio. The last line printed is
one JSON object with every figure.
"""

import json
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxft import metrics, optim, sharding, steps, tasks
from jaxft import state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:variant].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds (alternating with --torch); median reported")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_TORCH = flags.DEFINE_enum("torch", "none", ["none", "eager", "compile"],
                           "also time transformers' PyTorch GPT2LMHeadModel on the same shape")


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, t = config.batch_size, config.seq_len
  tokens = rng.integers(0, config.model.vocab_size, size=(b, t + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((b, t), np.float32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32)}


class JaxftRunner:
  """Builds the sharded state and the jitted step exactly as jaxft.train does."""

  def __init__(self, config):
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                   config.axis_rules)
    self.task = tasks.make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
    self.state, self.frozen, shardings, lay = state_lib.create_train_state(
        self.task, tx, seq_len=config.seq_len, seed=config.seed, mesh=mesh,
        axis_rules=config.axis_rules)
    step, _, batch_sh, _ = steps.jit_steps(self.task, tx, schedule, config, lay, shardings, mesh)
    self.batch = sharding.global_batch(random_batch(config), batch_sh)
    t = time.perf_counter()
    lowered = step.lower(self.state, self.frozen, self.batch)
    self.lower_s = time.perf_counter() - t
    t = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t

  def run(self, n: int) -> float:
    """Seconds per step over n steps (synchronised at the end)."""
    t = time.perf_counter()
    for _ in range(n):
      self.state, m = self.compiled(self.state, self.frozen, self.batch)
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t) / n

  def memory(self) -> dict[str, int]:
    out = {}
    analysis = self.compiled.memory_analysis()
    if analysis is not None:
      out.update(argument_bytes=int(analysis.argument_size_in_bytes),
                 output_bytes=int(analysis.output_size_in_bytes),
                 temp_bytes=int(analysis.temp_size_in_bytes))
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    # Linux reports ru_maxrss in KiB: the host process's peak resident memory.
    out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class TorchRunner:
  """transformers.GPT2LMHeadModel trained with torch.optim.AdamW on random tokens."""

  def __init__(self, config, mode: str):
    import torch
    import transformers

    m = config.model
    torch.manual_seed(config.seed)
    hf_cfg = transformers.GPT2Config(
        n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, vocab_size=m.vocab_size,
        n_positions=m.n_positions, resid_pdrop=m.resid_pdrop, embd_pdrop=m.embd_pdrop,
        attn_pdrop=m.attn_pdrop)
    self.model = transformers.GPT2LMHeadModel(hf_cfg).train()
    o = config.optim
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay)
    self.forward = torch.compile(self.model) if mode == "compile" else self.model
    batch = random_batch(config)
    self.inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
    self.labels = self.inputs  # HF shifts the labels inside the model
    t = time.perf_counter()
    self.run(1)  # compilation (torch.compile) and allocator warm-up
    self.compile_s = time.perf_counter() - t
    self.torch = torch

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      loss = self.forward(input_ids=self.inputs, labels=self.labels).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    loss.item()
    return (time.perf_counter() - t) / n


def benchmark(config, *, steps: int, rounds: int, warmup: int, torch_mode: str = "none") -> dict:
  tokens_per_step = config.batch_size * config.seq_len
  runner = JaxftRunner(config)
  runner.run(warmup)
  peer = TorchRunner(config, torch_mode) if torch_mode != "none" else None
  if peer is not None:
    peer.run(warmup)
  jax_times, torch_times = [], []
  for _ in range(rounds):
    jax_times.append(runner.run(steps))
    if peer is not None:
      torch_times.append(peer.run(steps))
  step_s = statistics.median(jax_times)
  flops_tok = metrics.flops_per_token(runner.task.model_cfg, config.seq_len)
  peak, peak_src = metrics.peak_flops_per_device()
  tokens_per_s = tokens_per_step / step_s
  result = {
      "variant": config.get("variant", ""), "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "batch_size": config.batch_size,
      "seq_len": config.seq_len, "dtype": config.model.dtype,
      "params": int(sum(x.size for x in jax.tree.leaves(runner.state.params))),
      "lower_s": round(runner.lower_s, 3), "compile_s": round(runner.compile_s, 3),
      "step_s": step_s, "step_s_rounds": jax_times, "tokens_per_s": tokens_per_s,
      "flops_per_token": flops_tok,
      "mfu": tokens_per_s * flops_tok / (peak * jax.device_count()), "mfu_vs": peak_src,
      **runner.memory(),
  }
  if peer is not None:
    torch_step = statistics.median(torch_times)
    result.update({f"torch_{torch_mode}_step_s": torch_step,
                   f"torch_{torch_mode}_tokens_per_s": tokens_per_step / torch_step,
                   f"torch_{torch_mode}_step_s_rounds": torch_times,
                   f"torch_{torch_mode}_compile_s": round(peer.compile_s, 3),
                   "jaxft_over_torch": torch_step / step_s})
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  r = benchmark(config, steps=_STEPS.value, rounds=_ROUNDS.value, warmup=_WARMUP.value,
                torch_mode=_TORCH.value)
  mem = r.get("device_peak_bytes") or r["temp_bytes"] + r["argument_bytes"]
  print(f"{r['variant'] or 'config'}: {r['params']:,} params, batch {r['batch_size']} x "
        f"{r['seq_len']} on {r['devices']} {r['device_kind']} device(s)")
  print(f"  compile {r['compile_s']:.2f}s (lowering {r['lower_s']:.2f}s)")
  print(f"  step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {100 * r['mfu']:.1f}% (vs {r['mfu_vs']})")
  print(f"  memory: {mem / 2**20:,.0f} MiB per device (compiled args+temps or device peak), "
        f"host peak RSS {r['host_peak_rss_bytes'] / 2**20:,.0f} MiB")
  if _TORCH.value != "none":
    key = f"torch_{_TORCH.value}"
    print(f"  transformers PyTorch ({_TORCH.value}): {r[key + '_tokens_per_s']:,.0f} tokens/s; "
          f"jaxft / torch = {r['jaxft_over_torch']:.2f}x")
  print(json.dumps(r))
  sys.stdout.flush()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
