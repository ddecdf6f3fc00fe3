"""Faults around checkpoints: a damaged newest step, a failed save, a second run on the same
workdir, a checkpoint from another format or of another train state."""

import errno
import glob
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jaxft import train
from jaxft.run import checkpoint, lock
from jaxft.run import workdir as workdir_lib
from jaxft.training import resume
from tests import helpers
from tests.helpers import train_config

setup_lib = importlib.import_module("jaxft.training.setup")  # the package exports setup()

STEPS = dict(num_steps=6, eval_every=100, checkpoint_every=2, keep_checkpoints=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run with checkpoints at 2, 4 and 6, and its config."""
  tmp = tmp_path_factory.mktemp("faults")
  config = train_config(tmp, **STEPS, **{"sample.max_new_tokens": 0})
  workdir = str(tmp / "run")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _steps(workdir):
  ckpt = checkpoint.Checkpointer(workdir, 3)
  steps = ckpt.steps()
  ckpt.close()
  return steps


def _losses(workdir):
  return [(r["step"], r["train/loss"], r["train/grad_norm"])
          for r in workdir_lib.read_metrics(workdir) if "train/loss" in r]


def _copy(trained, tmp_path):
  config, workdir = trained
  dst = str(tmp_path / "run")
  shutil.copytree(workdir, dst)
  return config.copy_and_resolve_references(), dst


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _garble(path):
  with open(path, "w") as f:
    f.write("{not json")


DAMAGE = {
    "truncated array file": (_truncate, "in OCDBT database at local file"),
    "missing array file": (lambda d: os.remove(_largest_array_file(d)),
                           "in OCDBT database at local file"),
    "unreadable tree metadata": (lambda d: _garble(os.path.join(d, "state", "_METADATA")),
                                 "_METADATA) is unreadable"),
    "unreadable run metadata": (lambda d: _garble(os.path.join(d, "meta", "metadata")),
                                "JSONDecodeError"),
    "missing data iterator state": (
        lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")),
        "no data iterator state"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_step_falls_back_to_the_previous_one(trained, tmp_path, caplog, kind):
  config, workdir = _copy(trained, tmp_path)
  damage, reason = DAMAGE[kind]
  damage(os.path.join(workdir, "checkpoints", "6"))
  config.keep_checkpoints = 1  # retention must not count (and so delete behind) the damaged 6
  with caplog.at_level(logging.INFO, logger="jaxft"):
    s = setup_lib.setup(config, workdir)
  s.ckpt.close()
  assert int(s.state.step) == 4
  assert f"checkpoint step 6 in {workdir}/checkpoints does not restore" in caplog.text
  assert reason in caplog.text
  assert f"resumed from step 4 in {workdir}/checkpoints" in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  moved = os.path.join(workdir, checkpoint.DAMAGED_DIR, "6")
  assert f"the damaged step 6 was moved to {moved}" in caplog.text
  assert os.path.isdir(os.path.join(moved, "state"))  # set aside, not deleted


def test_the_rerun_after_damage_ends_bit_identical_and_keeps_one_good_step(trained, tmp_path,
                                                                          caplog):
  config, workdir = _copy(trained, tmp_path)
  _truncate(os.path.join(workdir, "checkpoints", "6"))
  config.keep_checkpoints = 1
  with caplog.at_level(logging.INFO, logger="jaxft"):
    train.train_and_evaluate(config, workdir)
  assert f"resumed from step 4 in {workdir}/checkpoints" in caplog.text
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["6"]
  assert _losses(workdir) == _losses(trained[1])  # every step once, the same floats
  assert [r[0] for r in _losses(workdir)] == [1, 2, 3, 4, 5, 6]
  _, _, ours = helpers.open_trained(workdir, best=False)
  _, _, straight = helpers.open_trained(trained[1], best=False)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(straight), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_when_no_step_restores_one_error_lists_them_and_nothing_moves(trained, tmp_path):
  config, workdir = _copy(trained, tmp_path)
  for step in ("2", "4", "6"):
    _truncate(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(resume.NoRestorableCheckpointError) as err:
    setup_lib.setup(config, workdir)
  message = str(err.value)
  assert f"no checkpoint in {workdir}/checkpoints restores" in message
  assert all(f"step {s}: ValueError: " in message for s in (6, 4, 2))
  assert "Nothing was moved or deleted" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED_DIR))
  # evaluate / predict / export open the latest step: one message and the way out. (Its params
  # may sit outside the truncated file: remove every array file.)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6", "state", "ocdbt.process_0", "d"))
  with pytest.raises(ValueError, match=r"checkpoint step 6 in .*/checkpoints does not restore "
                                       r"\(ValueError: .*\); choose another step \(--step"):
    helpers.open_trained(workdir, best=False)


@pytest.fixture
def no_array_read(monkeypatch):
  """Fails the test if a resume reads the train state's arrays."""
  def refuse(*args, **kwargs):
    raise AssertionError("the train state was read before the checkpoint was checked")
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", refuse)


def test_checkpoints_carry_the_format_and_a_newer_format_is_refused(trained, tmp_path,
                                                                    no_array_read):
  config, workdir = _copy(trained, tmp_path)
  meta_path = os.path.join(workdir, "checkpoints", "6", "meta", "metadata")
  meta = json.load(open(meta_path))
  assert meta["format"] == checkpoint.FORMAT and meta["jaxft_version"] == "0.1.0"
  with open(meta_path, "w") as f:
    json.dump({**meta, "format": 99, "jaxft_version": "9.0"}, f)
  with pytest.raises(ValueError, match=r"checkpoint step 6 in .* has format 99, written by jaxft "
                                       r"9\.0; this jaxft \(0\.1\.0\) reads formats up to 1"):
    setup_lib.setup(config, workdir)


@pytest.mark.parametrize("field, value, named", [
    ("optim.clip_norm", 0.0, "config.optim.clip_norm=0.0 (the checkpoints' 1.0)"),
    ("peft.method", "lora", "config.peft.method='lora' (the checkpoints' 'none')"),
])
def test_a_resume_into_another_train_state_is_refused_before_reading(trained, tmp_path,
                                                                     no_array_read, field,
                                                                     value, named):
  config, workdir = _copy(trained, tmp_path)
  saved_config = open(os.path.join(workdir, "config.json")).read()
  helpers.set_fields(config, {field: value})
  with pytest.raises(ValueError) as err:
    setup_lib.setup(config, workdir)
  assert "holds another train state than this config builds" in str(err.value)
  assert named in str(err.value) and f"--config.init_from={workdir}" in str(err.value)
  assert open(os.path.join(workdir, "config.json")).read() == saved_config  # nothing lost


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_stops_with_the_cause_and_the_previous_step_resumes(tmp_path, monkeypatch,
                                                                         caplog, code):
  """The failure is raised where Orbax really writes: its background commit of step 4's
  metadata (the train loop has moved on by then)."""
  healthy = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def fails_at_step_4(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).startswith("4."):
      raise OSError(code, os.strerror(code), str(directory))
    return await healthy(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", fails_at_step_4)
  config = train_config(tmp_path, num_steps=4, eval_every=100, checkpoint_every=2,
                        **{"sample.max_new_tokens": 0})
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    train.train_and_evaluate(config, workdir)
  assert str(err.value).startswith(
      f"saving checkpoint step 4 to {workdir}/checkpoints failed: "
      f"{type(OSError(code, 'x')).__name__}: [Errno {code}] {os.strerror(code)}")
  assert "the newest checkpoint left is step 2, intact" in str(err.value)
  assert _steps(workdir) == [2]
  if code != errno.ENOSPC:
    return
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", healthy)
  with caplog.at_level(logging.INFO, logger="jaxft"):
    train.train_and_evaluate(config, workdir)
  assert f"resumed from step 2 in {workdir}/checkpoints" in caplog.text
  assert _steps(workdir) == [4, 2]


def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  config = train_config(tmp_path, num_steps=2, eval_every=100, **{"sample.max_new_tokens": 0})
  workdir = str(tmp_path / "run")
  holder = lock.WorkdirLock(workdir)
  holder.acquire()  # another run in progress (flock conflicts across open files, even here)
  try:
    with pytest.raises(lock.WorkdirLockedError) as err:
      train.train_and_evaluate(config, workdir)
    # The command line says the same in one line and exit code 1, no traceback.
    out = subprocess.run([sys.executable, "-m", "jaxft.train", "--config",
                          "configs/gpt2.py:tiny", "--workdir", workdir], cwd=helpers.ROOT,
                         capture_output=True, text=True, env={**os.environ,
                                                             "JAX_PLATFORMS": "cpu"})
  finally:
    holder.release()
  assert out.returncode == 1 and "Traceback" not in out.stderr
  held = f"{workdir} is in use by another run (pid {os.getpid()} on host "
  assert f"jaxft.train: {held}" in out.stderr and held in str(err.value)
  assert "train into another --workdir" in str(err.value)
  assert os.listdir(workdir) == [lock.LOCK_FILE]  # the refused runs wrote nothing

  # A run that died (SIGKILL drops its flock) leaves its record: the next run takes over.
  with open(os.path.join(workdir, lock.LOCK_FILE), "w") as f:
    json.dump({"pid": 999999, "host": "gone-host", "started": "2026-01-01T00:00:00+00:00",
               "command": "jaxft.train"}, f)
  with caplog.at_level(logging.WARNING, logger="jaxft"):
    train.train_and_evaluate(config, workdir)
  assert ("taking over the stale lock of a run that is gone (pid 999999 on host gone-host, "
          "started 2026-01-01T00:00:00+00:00: jaxft.train)") in caplog.text
  assert open(os.path.join(workdir, lock.LOCK_FILE)).read() == ""  # released at the end
