"""Persistence, and nothing else: Orbax checkpoints of the train state + grain iterator state +
metadata (saved together per step), the best params (workdir/best) and adapter-only files.

Saves are async: Orbax copies device arrays to host before `save` returns (so donated buffers
are safe), then writes in the background; `wait()` before exit. A step directory only appears
once complete, so a run killed mid-save resumes from the previous step. A save that fails (disk
full, permission denied), now or in the background, raises CheckpointSaveError naming the
directory and the cause; the steps already written stay as they were.

Each checkpoint's metadata carries FORMAT and the jaxft version that wrote it, so a resume can
refuse a checkpoint it cannot read before touching an array (jaxft/training/resume.py).
"""

import glob
import importlib.metadata
import json
import logging
import os
import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file, save_file

from jaxft import trees
from jaxft.run import workdir as workdir_lib

CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # steps that failed to restore, moved aside (never deleted)
BEST_DIR = "best"
ADAPTER_FILE = "adapter.safetensors"
# The layout of a checkpoint (items state/data/meta, the TrainState fields). Raise it when a
# change makes older jaxft unable to read new checkpoints.
FORMAT = 1

log = logging.getLogger("jaxft")


class CheckpointSaveError(RuntimeError):
  pass


def jaxft_version() -> str:
  try:
    return importlib.metadata.version("jaxft")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def cause(error: BaseException) -> str:
  """The innermost error's text: Orbax wraps the OSError that says what went wrong."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return f"{type(error).__name__}: {error}"


class Checkpointer:
  def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._saving = None  # the step whose background write may still fail

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """Every complete step on disk, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step: int, state, data_iter, meta: dict) -> None:
    meta = {**meta, "format": FORMAT, "jaxft_version": jaxft_version()}
    self.wait()  # the previous step's background write: its failure is reported as its own
    self._check(lambda: self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)), force=True), step)
    self._saving = step

  def _check(self, action, step: int | None) -> None:
    """Runs a save or a wait; a failure (this step's, or the background write of the previous
    one) becomes one message naming the directory, the cause and what is still there."""
    try:
      action()
    except Exception as e:
      failed = self._saving if self._saving is not None else step
      self._saving = None
      kept = [s for s in self.manager.all_steps() if s != failed]
      there = (f"the newest checkpoint left is step {max(kept)}, intact; rerun the same "
               "command to resume from it" if kept else "no earlier checkpoint exists")
      raise CheckpointSaveError(
          f"saving checkpoint step {failed} to {self.directory} failed: {cause(e)}. Free "
          f"space or fix the permissions of {self.directory}; {there}") from e

  def read_meta(self, step: int) -> dict:
    """The metadata of a step (JSON only; no array is read)."""
    with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
      meta = json.load(f)
    if not isinstance(meta, dict):
      raise ValueError(f"metadata of step {step} is {type(meta).__name__}, not an object")
    return meta

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """The train state's leaves as saved ("opt_state/1/0/mu/params/...": shape), from Orbax's
    tree metadata: no array is read."""
    directory = os.path.join(self.directory, str(step), "state")
    md = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(getattr(md, "item_metadata", md), "tree", None)
    if tree is None:  # Orbax logs the parse error and hands back nothing
      raise ValueError(f"the train state's tree metadata ({directory}/_METADATA) is unreadable")
    return {key_path(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def set_aside(self, step: int) -> str:
    """Moves a step that does not restore to workdir/checkpoints_damaged (kept for a post
    mortem; out of Orbax's sight, so keep-N counts only steps that restore)."""
    target = os.path.join(self.workdir, DAMAGED_DIR, str(step))
    if os.path.exists(target):
      target += f".{int(time.time())}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def restore(self, step: int, abstract_state, data_iter):
    """Restores onto the shardings in `abstract_state` (any mesh, any process count) and
    rewinds `data_iter`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    self._restore_data(step, data_iter)
    return out.state, out.meta

  def _restore_data(self, step: int, data_iter) -> None:
    """grain writes one iterator state per process (process_I-of-N.json). Every process builds
    the same global batches and keeps its rows (jaxft/data/pipeline.py), so the states are the
    same position: a run resumed with another process count takes process 0's."""
    directory = os.path.join(self.directory, str(step), "data")
    path = os.path.join(directory,
                        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if not os.path.exists(path):
      saved = sorted(glob.glob(os.path.join(directory, "process_0-of-*.json")))
      if not saved:
        raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no data "
                                f"iterator state ({directory}); it is incomplete")
      path = saved[0]
      log.info("data iterator state of %s (written by another process count)", path)
    with open(path) as f:
      data_iter.set_state(json.load(f))

  def wait(self) -> None:
    self._check(self.manager.wait_until_finished, None)
    self._saving = None

  def close(self, *, quiet: bool = False) -> None:
    """Waits for the last save and closes. `quiet` (an error is already on its way up): a
    failure here is logged, not raised, so it cannot mask that error."""
    try:
      self.wait()
    except CheckpointSaveError as e:
      if not quiet:
        raise
      log.error("%s", e)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # closing after a failed write must not hide the first error
        if not quiet:
          raise
        log.error("closing %s: %s", self.directory, cause(e))


def key_path(path) -> str:
  """A tree path as "a/0/b" whatever the node types (dict key, sequence index, attribute)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


class BestParams:
  """The params of the best validation score so far, in workdir/best (one step kept).

  Separate from the resumable checkpoints so that keep_checkpoints never deletes it; export,
  evaluate and predict use it when it exists."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
    # Its own barrier names: saved at the same step as the resumable checkpoint, the two
    # managers' multi-process barriers would otherwise collide.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")))

  def save(self, step: int, params, meta: dict) -> None:
    # A run killed between this save and its checkpoint's resumes before `step` and gets here
    # again: the new params replace the old ones.
    if step in self.manager.all_steps():
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, abstract_params):
    self.manager.wait_until_finished()
    out = self.manager.restore(self.manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"params": abstract_params})))
    return out.state["params"]

  def close(self, *, quiet: bool = False) -> None:
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception as e:
      if not quiet:
        raise CheckpointSaveError(f"saving the best params to {self.directory} failed: "
                                  f"{cause(e)}") from e
      log.error("saving the best params to %s failed: %s", self.directory, cause(e))


def restore_params(workdir: str, abstract, step: int | None = None, best: bool = True):
  """The trainable variables (no optimizer state) of a workdir's checkpoint, onto the shardings
  of `abstract`: the best (workdir/best) unless `best` is False or a `step` is given, else the
  latest."""
  manager = None
  if best and step is None and os.path.isdir(os.path.join(workdir, BEST_DIR)):
    directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    if manager.latest_step() is None:  # no evaluation finished yet
      manager.close()
      manager = None
  if manager is None:
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint yet under {directory}")
  try:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract},
        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}),
        partial_restore=True)))
  except Exception as e:  # Orbax wraps tensorstore's error (a bad file) in a bare Exception
    raise ValueError(f"checkpoint step {step} in {directory} does not restore ({cause(e)}); "
                     "choose another step (--step; rerunning the training sets damaged steps "
                     "aside and resumes from the newest good one)") from e
  finally:
    manager.close()
  # partial_restore hands back the abstract leaf for anything the checkpoint lacks.
  missing = ["/".join(map(str, k)) for k, v in
             trees.flat(out.state["params"]).items() if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"the checkpoint of step {step} in {directory} lacks {len(missing)} "
                     f"trainable variable(s) of this run's model, e.g. {missing[:4]}: it was "
                     "written for another model or by an older jaxft (before variables were "
                     "split into trainable and frozen); retrain, or load it with that version")
  return out.state["params"]


# -- adapter-only files ------------------------------------------------------------------------

def save_adapter(out_dir: str, workdir: str, trainable) -> list[str]:
  """The trainable variables of a run (PEFT params and the task head) as one safetensors file,
  next to the run's config.json and labels.json: a directory that jaxft/run/loader.py (and so
  evaluate, predict, generate, prompt_eval and export) opens on top of its base model."""
  os.makedirs(out_dir, exist_ok=True)
  tensors = {k: np.ascontiguousarray(np.asarray(jax.device_get(v)))
             for k, v in trees.flat_paths(trainable).items()}
  save_file(tensors, os.path.join(out_dir, ADAPTER_FILE))
  written = [ADAPTER_FILE]
  for name in (workdir_lib.CONFIG_FILE, workdir_lib.LABELS_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out_dir, name))
      written.append(name)
  return written


def read_adapter(directory: str, abstract) -> dict:
  """An adapter file checked against the model it is loaded into (names and shapes)."""
  path = os.path.join(directory, ADAPTER_FILE)
  tensors = load_file(path)
  want = trees.flat_paths(abstract)
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  if missing or extra:
    raise ValueError(f"{path} does not fit the model of its config.json: missing "
                     f"{missing[:6]}, unexpected {extra[:6]}; was it saved from another run?")
  for name, spec in want.items():
    if tuple(tensors[name].shape) != tuple(spec.shape):
      raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                       f"expects {tuple(spec.shape)}")
  device = jax.local_devices()[0]
  return trees.unflat({
      tuple(name.split("/")): jax.device_put(tensors[name].astype(spec.dtype), device)
      for name, spec in want.items()})
