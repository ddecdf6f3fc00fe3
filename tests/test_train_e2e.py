"""The training loop end to end: outputs, resume after SIGKILL, NaN halt, user errors."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxft import train
from jaxft.run import checkpoint, optim
from jaxft.run import workdir as workdir_lib
from tests import helpers
from tests.helpers import ROOT, train_config, write_corpus


def test_run_writes_everything_a_user_looks_at(tmp_path, capsys):
  config = train_config(tmp_path, num_steps=6, eval_every=3, checkpoint_every=2,
                        keep_checkpoints=2)
  workdir = str(tmp_path / "run")
  val = train.train_and_evaluate(config, workdir)
  assert np.isfinite(val["loss"]) and val["perplexity"] == pytest.approx(np.exp(val["loss"]))
  for name in ("config.json", "run_info.json", "metrics.jsonl", "loss_curve.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  info = json.load(open(os.path.join(workdir, "run_info.json")))
  assert info["packages"]["jax"] and info["git_sha"]
  records = workdir_lib.read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 7))
  assert [r["step"] for r in records if "val/loss" in r] == [3, 6]
  timed = [r for r in records if "train/loss" in r and r["step"] > 1]
  assert timed and all(
      r["train/tokens_per_s_per_device"] == pytest.approx(r["train/tokens_per_s"] / 8)
      and r["train/mfu"] > 0 and r["train/model_tflops_per_s_per_device"] > 0
      and 0 <= r["train/input_wait_fraction"] < 1 for r in timed)
  out = capsys.readouterr().out
  assert "final validation loss" in out and "unigram baseline" in out
  assert out.count("--- sample ---") == len(config.sample.prompts)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep-N
  saved_config, _, params = helpers.open_trained(workdir)
  assert saved_config.num_steps == 6
  assert params["params"]["transformer"]["wte"]["embedding"].shape == (50257, 32)


def _train_cmd(workdir, corpus, tfds_dir, steps):
  return [sys.executable, "-m", "jaxft.train", "--config", "configs/gpt2.py:tiny",
          "--workdir", workdir, f"--config.data.files={corpus}",
          f"--config.data.data_dir={tfds_dir}", f"--config.num_steps={steps}",
          "--config.seq_len=64", "--config.model.n_positions=64", "--config.model.n_embd=64",
          "--config.checkpoint_every=10", "--config.log_every=1", "--config.eval_every=1000",
          "--config.sample.max_new_tokens=0", "--config.model.embd_pdrop=0.1",
          "--config.model.attn_pdrop=0.1", "--config.model.resid_pdrop=0.1"]


def _logged_losses(workdir):
  return [(r["step"], r["train/loss"]) for r in workdir_lib.read_metrics(workdir)
          if "train/loss" in r]


def _saves_in_progress(workdir) -> set[tuple[str, int]]:
  """(name, inode) of Orbax's temporary directories: the saves being written, or left behind
  by a killed run (a new save of the same step reuses the name, not the inode)."""
  directory = os.path.join(workdir, "checkpoints")
  found = set()
  for name in os.listdir(directory) if os.path.isdir(directory) else ():
    if "tmp" in name:
      try:
        found.add((name, os.stat(os.path.join(directory, name)).st_ino))
      except FileNotFoundError:  # finalised (renamed) meanwhile
        pass
  return found


def _run_until(cmd, env, log_path, moment, workdir):
  """Starts a training run and SIGKILLs it at `moment`: ("step", n) once step n is logged,
  ("save",) while Orbax is writing a checkpoint in the background (its tmp directory exists),
  ("start", s) s seconds after start (during imports or compilation)."""
  # A save the previous kill interrupted leaves its temporary directory behind: only a new
  # one is this run's save in progress.
  left_behind = _saves_in_progress(workdir)
  with open(log_path, "w") as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
  t0, deadline = time.time(), time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if moment[0] == "save" and _saves_in_progress(workdir) - left_behind:
      break
    if moment[0] == "start" and time.time() - t0 >= moment[1]:
      break
    logged = _logged_losses(workdir) if moment[0] == "step" else []
    if logged and logged[-1][0] >= moment[1]:
      break
    time.sleep(0.001 if moment[0] == "save" else 0.02)
  assert proc.poll() is None, f"the run ended before it could be killed at {moment}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return open(log_path).read()


def test_sigkill_at_random_moments_then_rerun_is_bit_identical(tmp_path):
  """A bounded loop of kills (after a random step, during an async save, during start-up), each
  followed by a rerun that resumes; the last rerun finishes. Dropout on, so the per-step keys
  must replay exactly too; every logged loss and the final params equal an uninterrupted run's."""
  corpus = write_corpus(str(tmp_path / "corpus"))
  tfds_dir, steps = str(tmp_path / "tfds"), 60
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
  straight = str(tmp_path / "straight")
  subprocess.run(_train_cmd(straight, corpus, tfds_dir, steps), cwd=ROOT, env=env, check=True,
                 capture_output=True)

  killed = str(tmp_path / "killed")
  cmd = _train_cmd(killed, corpus, tfds_dir, steps)
  rng = np.random.default_rng(0)
  moments = [("step", int(rng.integers(12, 45))), ("save",), ("start", float(rng.uniform(1, 4)))]
  for i, moment in enumerate(moments):
    saved = checkpoint.Checkpointer(killed, 3) if os.path.isdir(killed) else None
    newest = saved.latest_step() if saved else None
    if saved:
      saved.close()
    out = _run_until(cmd, env, str(tmp_path / f"run{i}.log"), moment, killed)
    if newest is not None and moment[0] != "start":  # it got far enough to say so
      assert f"resumed from step {newest} in {killed}/checkpoints" in out, (moment, out[-2000:])
      assert "taking over the stale lock of a run that is gone" in out
  assert _logged_losses(killed)[-1][0] < steps
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)

  assert _logged_losses(killed) == _logged_losses(straight)  # exact floats, every step once
  _, _, p_straight = helpers.open_trained(straight)
  _, _, p_killed = helpers.open_trained(killed)
  import jax
  for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_killed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _poison(where, seed, at_step):
  """The task's loss with a NaN entering the real computation at one step: in the loss value
  (its gradient stays finite) or in the gradients only (the loss stays finite). The step is
  recognised by its dropout key, fold_in(train key, step) as jaxft/run/steps.py draws it."""
  import jax
  import jax.numpy as jnp

  from jaxft.tasks import causal_lm

  _, train_key = jax.random.split(jax.random.key(seed))
  target = jax.random.key_data(jax.random.fold_in(train_key, at_step))
  healthy = causal_lm.CausalLM.loss

  @jax.custom_vjp
  def nan_gradient(x, factor):
    return x

  def fwd(x, factor):
    return x, factor

  def bwd(factor, g):
    return g * factor, jnp.zeros_like(factor)

  nan_gradient.defvjp(fwd, bwd)

  def loss(self, variables, batch, rng, deterministic=False):
    loss_sum, aux = healthy(self, variables, batch, rng, deterministic)
    if rng is None:  # evaluation
      return loss_sum, aux
    hit = jnp.all(jax.random.key_data(rng) == target)
    if where == "loss":
      loss_sum = loss_sum + jax.lax.stop_gradient(jnp.where(hit, jnp.nan, 0.0))
    else:
      loss_sum = nan_gradient(loss_sum, jnp.where(hit, jnp.nan, 1.0))
    return loss_sum, aux

  return loss


@pytest.mark.parametrize("where, quantity", [("loss", "train/loss"),
                                             ("gradients", "train/grad_norm"),
                                             ("update", "train/update_norm")])
def test_nonfinite_values_halt_and_the_rerun_resumes_from_the_last_good_checkpoint(
    tmp_path, monkeypatch, caplog, where, quantity):
  from jaxft.tasks import causal_lm

  config = train_config(tmp_path, num_steps=8, checkpoint_every=2, eval_every=100,
                        **{"sample.max_new_tokens": 0, "optim.warmup_steps": 0})
  if where == "update":  # a NaN learning rate from step 5 on: only the update carries it
    healthy = optim.lr_schedule

    def breaks_at_step_5(optim_cfg, num_steps):
      import jax.numpy as jnp
      base = healthy(optim_cfg, num_steps)
      return lambda step: jnp.where(step < 4, base(step), jnp.nan)

    monkeypatch.setattr(optim, "lr_schedule", breaks_at_step_5)
  else:
    monkeypatch.setattr(causal_lm.CausalLM, "loss", _poison(where, config.seed, at_step=4))
  workdir = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteLossError,
                     match=rf"{quantity} became nan at step 5.*last good checkpoint is step 4"):
    train.train_and_evaluate(config, workdir)
  assert [s for s, _ in _logged_losses(workdir)] == [1, 2, 3, 4]  # nothing after the NaN
  ckpt = checkpoint.Checkpointer(workdir, 3)
  assert ckpt.steps() == [4, 2]
  ckpt.close()
  _, _, params = helpers.open_trained(workdir, best=False)
  import jax
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  if where != "gradients":
    return
  monkeypatch.undo()  # the fix: a lower learning rate, and the NaN gone
  config.optim.lr = config.optim.lr / 2
  with caplog.at_level(logging.INFO, logger="jaxft"):
    train.train_and_evaluate(config, workdir)
  assert f"resumed from step 4 in {workdir}/checkpoints" in caplog.text
  assert [s for s, _ in _logged_losses(workdir)] == list(range(1, 9))
  assert all(np.isfinite(loss) for _, loss in _logged_losses(workdir))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxft.train", *args], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_unknown_variant_and_unknown_field_are_named(tmp_path):
  out = _cli("--config", "configs/gpt2.py:huge", "--workdir", str(tmp_path))
  assert out.returncode != 0 and "unknown variant 'huge'" in out.stderr
  assert "tiny" in out.stderr
  out = _cli("--config", "configs/gpt2.py:tiny", "--workdir", str(tmp_path),
             "--config.optim.learning_rate=1e-3")
  assert out.returncode != 0 and "learning_rate" in out.stderr


def test_missing_data_files_are_named(tmp_path):
  config = train_config(tmp_path)
  config.data.files = str(tmp_path / "nowhere" / "*.txt")
  with pytest.raises(Exception, match=r"config\.data\.files"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_empty_data_files_are_named(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  config = train_config(tmp_path)
  config.data.files = str(tmp_path / "empty" / "*.txt")
  with pytest.raises(Exception, match=r"empty|no text"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_missing_init_from_directory_is_named(tmp_path):
  config = train_config(tmp_path, init_from=str(tmp_path / "no_such_model"))
  with pytest.raises(Exception, match=r"init_from"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_that_does_not_divide_over_the_mesh(tmp_path):
  config = train_config(tmp_path, batch_size=12)  # 8 fake devices
  with pytest.raises(ValueError, match=r"config.batch_size=12"):
    train.train_and_evaluate(config, str(tmp_path / "run"))



def test_resuming_with_another_model_layout_is_refused_and_init_from_converts(tmp_path):
  """A workdir trained with scan_layers (stacked params) cannot resume as the per-layer model:
  a clear error, nothing lost; --config.init_from=<workdir> converts its weights instead."""
  import jax

  from jaxft import hf, tasks
  from jaxft.parallel import sharding
  from jaxft.run import loader
  from jaxft.run import state as state_lib

  config = train_config(tmp_path, num_steps=2, eval_every=100, checkpoint_every=2)
  config.model.scan_layers = True
  scanned = str(tmp_path / "scanned")
  train.train_and_evaluate(config, scanned)
  config.model.scan_layers = False
  config.num_steps = 4
  with pytest.raises(ValueError, match=r"config\.model\.scan_layers=False \(the checkpoints' "
                                       r"True\).*--config\.init_from="):
    train.train_and_evaluate(config, scanned)
  assert checkpoint.Checkpointer(scanned, 3).latest_step() == 2
  # A config.json written before scan_layers existed reads as scan_layers=False: refused too.
  path = os.path.join(scanned, "config.json")
  original = open(path).read()
  old_format = json.loads(original)
  del old_format["model"]["scan_layers"]
  with open(path, "w") as f:
    json.dump(old_format, f)
  config.model.scan_layers = True
  with pytest.raises(ValueError, match=r"config\.model\.scan_layers=True \(the checkpoints' "
                                       r"False\)"):
    train.train_and_evaluate(config, scanned)
  with open(path, "w") as f:
    f.write(original)
  config.model.scan_layers = False

  _, _, trained = helpers.open_trained(scanned)
  assert trained["params"]["transformer"]["h"]["attn"]["query"]["kernel"].ndim == 4
  config.init_from = scanned
  config = loader.resolve(config)
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  start = loader.initial_variables(task, config, lay)["params"]
  assert "h_1" in start["transformer"]
  expected = hf.to_hf_tensors(trained["params"])
  for name, tensor in hf.to_hf_tensors(start).items():
    np.testing.assert_array_equal(tensor, expected[name], err_msg=name)
