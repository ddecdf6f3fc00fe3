"""Training entry point.

    python -m jaxft.train --config configs/gpt2.py[:variant] --workdir runs/x [--config.FIELD=V]

Rerunning the same command resumes from the newest checkpoint in the workdir: the train state,
the data iterator and the per-step random keys continue exactly where they stopped.
`train_and_evaluate(config, workdir)` is the importable core (Colab, tests).
"""

import json
import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import linen as nn
from ml_collections import config_flags

from jaxft import checkpoint, metrics, optim, sharding, steps, tasks
from jaxft import state as state_lib
from jaxft.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")

log = logging.getLogger("jaxft")


class NonFiniteLossError(RuntimeError):
  pass


def apply_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With config.init_from, the architecture comes from the HF config.json."""
  if not config.init_from:
    return config
  from jaxft import hf
  from jaxft.data.tokenizer import has_tokenizer

  overrides = hf.model_overrides(hf.read_hf_config(config.init_from))
  changed = {k: (config.model[k], v) for k, v in overrides.items() if config.model[k] != v}
  if changed:
    log.info("init_from %s sets config.model fields: %s", config.init_from, changed)
  with config.unlocked():
    config.model.update(overrides)
    if not config.data.tokenizer and has_tokenizer(config.init_from):
      config.data.tokenizer = config.init_from
  return config


def _check_vocab(config) -> None:
  from jaxft.data.tokenizer import load_tokenizer

  tok = load_tokenizer(config.data.tokenizer or None)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer ({config.data.tokenizer or 'GPT-2 BPE'}) has "
                     f"{tok.vocab_size} tokens but config.model.vocab_size="
                     f"{config.model.vocab_size}: raise config.model.vocab_size to at least "
                     f"{tok.vocab_size} or use the model's own tokenizer")


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _check_finite(records: list[dict], workdir: str, last_saved: int | None) -> None:
  for r in records:
    bad = [k for k in ("train/loss", "train/grad_norm", "train/update_norm")
           if not math.isfinite(r[k])]
    if bad:
      kept = (f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints"
              if last_saved is not None else "no checkpoint had been written yet")
      raise NonFiniteLossError(
          f"{bad[0]} became {r[bad[0]]} at step {r['step']}; training stopped and nothing "
          f"after it was saved ({kept}). Lower config.optim.lr, keep config.optim.clip_norm "
          "> 0 or use float32 (config.model.dtype), then rerun to resume from that checkpoint.")


def evaluate(eval_step, params, batches, batch_sh, task) -> dict[str, float]:
  total = None
  for batch in batches:
    sums = eval_step(params, sharding.global_batch(batch, batch_sh))
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  return task.summarize(_host(total))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) to config.num_steps; returns the final validation metrics."""
  os.makedirs(workdir, exist_ok=True)
  config = apply_init_from(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                 config.axis_rules)
  task = tasks.make_task(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_steps)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  latest = ckpt.latest_step()

  # Data first: a missing corpus should fail before any compilation.
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = pipeline.train_iterator(config.data, seq_len=config.seq_len,
                                       global_batch_size=config.batch_size,
                                       seed=config.data.shuffle_seed, **proc)
  eval_batches = pipeline.eval_batches(config.data, seq_len=config.seq_len,
                                       global_batch_size=config.batch_size,
                                       max_batches=config.eval_batches or None, **proc)

  _check_vocab(config)
  init_params = None
  if latest is None and config.init_from:
    from jaxft import hf

    expected = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0),
                                                         config.seq_len))["params"])
    init_params = hf.load_hf_params(config.init_from, expected)
  shardings = state_lib.state_shardings(task, tx, config.seq_len, mesh, config.axis_rules)
  if latest is None:
    state, _ = state_lib.create_train_state(task, tx, seq_len=config.seq_len, seed=config.seed,
                                            mesh=mesh, axis_rules=config.axis_rules,
                                            params=init_params)
  else:
    target = state_lib.abstract_state(task, tx, seq_len=config.seq_len, shardings=shardings)
    state, _ = ckpt.restore(latest, target, train_iter)
    log.info("resumed from step %d in %s", latest, ckpt.directory)
    _truncate_metrics(workdir, latest)
  checkpoint.save_config(workdir, config)
  metrics.write_run_info(workdir)

  batch_sh = sharding.batch_sharding(mesh, config.axis_rules)
  train_step = jax.jit(
      steps.make_train_step(task.loss, tx, schedule, config.grad_accum_steps),
      in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(task.eval_sums),
                      in_shardings=(shardings.params, batch_sh))

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  flops_tok = metrics.flops_per_token(task.model_cfg, config.seq_len)
  peak, peak_src = metrics.peak_flops_per_device()
  log.info("model: %s parameters; mesh %s; %.1f MFLOP/token (MFU vs %s)", f"{n_params:,}",
           dict(mesh.shape), flops_tok / 1e6, peak_src)

  writer = metrics.Writer(workdir)
  start = int(jax.device_get(state.step))
  last_saved = latest
  pending = []
  bar = metrics.progress_bar(start, config.num_steps)
  t_last, untimed = time.perf_counter(), 0
  val = {}

  def flush(step):
    """Host-side: average the pending step metrics, check them, log them."""
    nonlocal pending, t_last, untimed
    if not pending:
      return
    host = _host(pending)
    now = time.perf_counter()
    _check_finite([{"step": step - len(host) + i + 1,
                    **{f"train/{k}": float(m[k]) for k in ("loss", "grad_norm", "update_norm")}}
                   for i, m in enumerate(host)], workdir, last_saved)
    rec = {"step": step, **{f"train/{k}": float(np.mean([m[k] for m in host]))
                            for k in ("loss", "grad_norm", "lr", "accuracy")}}
    timed = host[untimed:]
    if timed:
      rec["train/tokens_per_s"] = float(sum(m["tokens"] for m in timed)) / max(now - t_last, 1e-9)
      rec["train/mfu"] = rec["train/tokens_per_s"] * flops_tok / (peak * jax.device_count())
    writer.write(step, rec)
    bar.set_postfix(loss=f"{rec['train/loss']:.3f}", lr=f"{rec['train/lr']:.2e}",
                    tok_s=f"{rec.get('train/tokens_per_s', 0):.0f}")
    pending, t_last, untimed = [], now, 0

  try:
    for step in range(start, config.num_steps):
      batch = sharding.global_batch(next(train_iter), batch_sh)
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      done = step + 1
      bar.update(1)
      if step == start:  # the first step includes compilation: keep it out of tokens/s
        jax.block_until_ready(step_metrics)
        log.info("first step (compile + run) took %.1fs", time.perf_counter() - t_last)
        t_last, untimed = time.perf_counter(), len(pending)
      is_last = done == config.num_steps
      if done % config.log_every == 0 or is_last:
        flush(done)
      if done % config.eval_every == 0 or is_last:
        flush(done)
        val = evaluate(eval_step, state.params, eval_batches, batch_sh, task)
        writer.write(done, {f"val/{k}": v for k, v in val.items()})
        bar.write(f"step {done}: validation loss {val['loss']:.4f}, "
                  f"perplexity {val['perplexity']:.2f}")
        t_last = time.perf_counter()  # evaluation time is not training throughput
      if done % config.checkpoint_every == 0 or is_last:
        flush(done)  # never save past a non-finite loss
        ckpt.save(done, state, train_iter, {"step": done, "val": val})
        last_saved = done
        t_last = time.perf_counter()
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  if not val:  # nothing left to train (already finished): still report
    val = evaluate(eval_step, state.params, eval_batches, batch_sh, task)
  _report(config, workdir, task, state.params, val, eval_batches)
  return val


def _truncate_metrics(workdir: str, step: int) -> None:
  """Drop records logged after the checkpoint we resume from: they will be logged again."""
  if jax.process_index() != 0:
    return
  kept = [r for r in metrics.read_metrics(workdir) if r["step"] <= step]
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def _report(config, workdir, task, params, val, eval_batches) -> None:
  """End of run: loss curve, validation vs the unigram baseline, sample generations."""
  if jax.process_index() != 0:
    return
  png = metrics.plot_loss_curve(workdir, metrics.read_metrics(workdir))
  unigram = pipeline.unigram_cross_entropy(config.data, eval_batches)
  print(f"final validation loss {val['loss']:.4f} nats/token (perplexity "
        f"{val['perplexity']:.1f}); unigram baseline fitted on the training split: "
        f"{unigram:.4f} nats/token")
  if png:
    print(f"loss curve: {png}")
  if config.sample.prompts and config.sample.max_new_tokens > 0:
    from jaxft import generate
    from jaxft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(config.data.tokenizer or None)
    prompts = [tok.encode(p) for p in config.sample.prompts]
    outs = generate.generate(task.model, _host(params), prompts,
                             max_new_tokens=config.sample.max_new_tokens,
                             temperature=config.sample.temperature, top_k=config.sample.top_k,
                             seed=config.seed, eos_id=tok.eos_id)
    for prompt, out in zip(config.sample.prompts, outs):
      print(f"--- sample ---\n{prompt}{tok.decode(out)}")


def main(argv):
  del argv
  # Our progress at INFO; the libraries' (orbax, TFDS, grain) INFO chatter only with -v 0.
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (where checkpoints and logs go)")
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLossError as e:
    log.error("%s", e)
    raise SystemExit(3) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
