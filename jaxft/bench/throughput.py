"""Times the train step of any config: compile time, step time, tokens/s, MFU, peak memory.
(`python -m jaxft.bench` runs it: jaxft/bench/__main__.py.)

    python -m jaxft.bench --config configs/gpt2.py:cpu-bench [--config.FIELD=V ...] \
        [--steps 10] [--rounds 3] [--torch compile] [--noinput]
    python -m jaxft.bench --config configs/finetune.py:bbc_news --torch eager

The step is the one `jaxft.train` runs (same sharded state, same jit with donation, the model
sizes filled from `config.init_from` as training fills them; the weights are random). Causal
LM batches are random tokens in the batch contract (one segment per row), so the figures are
the step's alone, not the data pipeline's; other tasks (fine-tuning heads, masked LM) time
the first batch of their own training data, whose labels their loss needs. tokens/s counts
non-padding tokens. Unless --noinput, each round also runs the step fed by the task's
own training pipeline (read, tokenised, packed and put on the devices ahead, as jaxft.train
feeds it): the step time it adds over the fixed batch is the device waiting for input
(device_idle_fraction). `--torch eager|compile` also trains the task's transformers model
(GPT2LMHeadModel, BertForSequenceClassification, ...: `task.architecture` with the same
config, dropout included) with torch.optim.AdamW on the same batch, in the same process,
alternating rounds with jaxft so both see the same machine load, and reports the ratio. The
last line printed is one JSON object with every figure.
"""

import json
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxft import hf, peft, tasks
from jaxft.parallel import sharding
from jaxft.run import adversarial, flops, loader, optim, prefetch, steps
from jaxft.run import state as state_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:variant].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds (alternating with --torch); median reported")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_INPUT = flags.DEFINE_boolean(
    "input", True, "also time the step fed by the task's training pipeline (prepared ahead, as "
    "in jaxft.train) and report the fraction of time the device waits for input")
_TORCH = flags.DEFINE_enum("torch", "none", ["none", "eager", "compile"],
                           "also time the task's transformers (PyTorch) model on the same batch")


class JaxftRunner:
  """Builds the sharded state and the jitted step exactly as jaxft.train does."""

  def __init__(self, config):
    if jax.process_count() > 1:
      raise ValueError("jaxft.bench times one process; run it without launch.local / "
                       "jax.distributed (a multi-host step is timed by jaxft.train's log)")
    config = loader.resolve(config)
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                   config.axis_rules)
    self.task = tasks.make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, config.num_steps, self.task.peft)
    self.state, self.frozen, shardings, lay = state_lib.create_train_state(
        self.task, tx, seq_len=config.seq_len, seed=config.seed, mesh=mesh,
        axis_rules=config.axis_rules)
    step, _, batch_sh, _ = steps.jit_steps(self.task, tx, schedule, config, lay, shardings, mesh)
    self.batch_sharding = batch_sh
    self.host_batch = self.task.benchmark_batch(config.data.shuffle_seed)
    self.batch = sharding.global_batch(self.host_batch, batch_sh)
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

  def run_input(self, n: int) -> tuple[float, float]:
    """(seconds per step, fraction of the time spent waiting for input) over n steps fed by
    the task's own training pipeline, prepared ahead as jaxft.train prepares it
    (run/prefetch.py). A new pipeline each round, closed after it (its thread must not compete
    with the other rounds); its first DEPTH + 1 steps run untimed, so no batch prepared before
    the timed steps began is counted."""
    batches = prefetch.DeviceBatches(
        self.task.train_iterator(self.config.data.shuffle_seed), self.batch_sharding)
    try:
      for _ in range(prefetch.DEPTH + 1):
        self.state, m = self.compiled(self.state, self.frozen, next(batches))
      jax.block_until_ready(m["loss"])
      t, waited = time.perf_counter(), batches.wait_s
      for _ in range(n):
        self.state, m = self.compiled(self.state, self.frozen, next(batches))
      jax.block_until_ready(m["loss"])
      wall = time.perf_counter() - t
      return wall / n, (batches.wait_s - waited) / wall
    finally:
      batches.close()

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


def torch_inputs(task, batch: dict[str, np.ndarray], torch) -> dict:
  """The batch as keyword arguments of the task's transformers model (its loss included)."""
  return {k: torch.from_numpy(np.asarray(v).astype(np.int64))
          for k, v in task.hf_inputs(batch).items()}


class TorchRunner:
  """The task's transformers model (task.architecture, the same config: sizes, dropout)
  trained with torch.optim.AdamW on the jaxft step's batch."""

  def __init__(self, config, task, batch: dict[str, np.ndarray], mode: str):
    import torch  # heavy and optional (the test extra): only for --torch
    import transformers

    torch.manual_seed(config.seed)
    tokenizer = getattr(task, "tokenizer", None)  # its pad / EOS ids go into the HF config
    hf_cfg = transformers.AutoConfig.for_model(
        **hf.config_dict(task.model_cfg, tokenizer, task.architecture, task.labels))
    self.model = getattr(transformers, task.architecture)(hf_cfg).train()
    o = config.optim
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay)
    self.forward = torch.compile(self.model) if mode == "compile" else self.model
    self.inputs = torch_inputs(task, batch, torch)
    t = time.perf_counter()
    self.run(1)  # compilation (torch.compile) and allocator warm-up
    self.compile_s = time.perf_counter() - t
    self.torch = torch

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      loss = self.forward(**self.inputs).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    loss.item()
    return (time.perf_counter() - t) / n


def benchmark(config, *, steps: int, rounds: int, warmup: int, torch_mode: str = "none",
              with_input: bool = False) -> dict:
  method = peft.make(config.get("peft")).name  # resolved as training resolves it
  if torch_mode != "none" and method != "none":
    raise ValueError(f"--torch trains the full transformers model, so it is no peer for "
                     f"config.peft.method={method!r}; drop --torch or the PEFT method")
  peak, peak_src = flops.peak_flops_per_device()  # on CPU measured now, on an idle machine
  runner = JaxftRunner(config)
  tokens_per_step = int((np.asarray(runner.host_batch["segment_ids"]) > 0).sum())
  runner.run(warmup)
  peer = (TorchRunner(config, runner.task, runner.host_batch, torch_mode)
         if torch_mode != "none" else None)
  if peer is not None:
    peer.run(warmup)
  jax_times, torch_times, input_rounds = [], [], []
  for _ in range(rounds):
    jax_times.append(runner.run(steps))
    if peer is not None:
      torch_times.append(peer.run(steps))
    if with_input:
      input_rounds.append(runner.run_input(steps))
  step_s = statistics.median(jax_times)
  flops_tok = runner.task.flops_per_token(config.seq_len) * adversarial.passes(config)
  result = {
      "variant": config.get("variant", ""), "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "batch_size": config.batch_size,
      "seq_len": config.seq_len, "dtype": config.model.dtype,
      "params": int(sum(x.size for x in jax.tree.leaves(runner.state.params))),
      "lower_s": round(runner.lower_s, 3), "compile_s": round(runner.compile_s, 3),
      "step_s": step_s, "step_s_rounds": jax_times, "tokens_per_step": tokens_per_step,
      **flops.throughput(tokens_per_step / step_s, flops_tok, peak, jax.device_count()),
      "flops_per_token": flops_tok, "mfu_vs": peak_src, "peak_flops_per_device": peak,
      **runner.memory(),
  }
  if with_input:
    input_step = statistics.median(r[0] for r in input_rounds)
    result.update({
        "input_step_s": input_step, "input_step_s_rounds": [r[0] for r in input_rounds],
        "input_wait_fraction": statistics.median(r[1] for r in input_rounds),
        # The step on its fixed batch is pure compute: what the pipeline adds is idle time.
        "device_idle_fraction": max(0.0, 1.0 - step_s / input_step)})
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
                torch_mode=_TORCH.value, with_input=_INPUT.value)
  mem = r.get("device_peak_bytes") or r["temp_bytes"] + r["argument_bytes"]
  print(f"{r['variant'] or 'config'}: {r['params']:,} params, batch {r['batch_size']} x "
        f"{r['seq_len']} on {r['devices']} {r['device_kind']} device(s)")
  print(f"  compile {r['compile_s']:.2f}s (lowering {r['lower_s']:.2f}s)")
  print(f"  step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
        + (f"MFU {100 * r['mfu']:.1f}% (vs {r['mfu_vs']})" if "mfu" in r
           else f"MFU n/a ({r['mfu_vs']})"))
  print(f"  memory: {mem / 2**20:,.0f} MiB per device (compiled args+temps or device peak), "
        f"host peak RSS {r['host_peak_rss_bytes'] / 2**20:,.0f} MiB")
  if _INPUT.value:
    print(f"  fed by the training pipeline: step {r['input_step_s'] * 1e3:.1f} ms; the device "
          f"waits for input {100 * r['device_idle_fraction']:.1f}% of the time (the loop "
          f"blocked on a batch {100 * r['input_wait_fraction']:.1f}%)")
  if _TORCH.value != "none":
    key = f"torch_{_TORCH.value}"
    print(f"  transformers PyTorch ({_TORCH.value}): {r[key + '_tokens_per_s']:,.0f} tokens/s; "
          f"jaxft / torch = {r['jaxft_over_torch']:.2f}x")
  print(json.dumps(r))
  sys.stdout.flush()

