"""Orbax checkpoints: train state + grain iterator state + metadata, saved together per step.

Saves are async: Orbax copies device arrays to host before `save` returns (so donated buffers
are safe), then writes in the background; `wait()` before exit. A step directory only appears
once complete, so a run killed mid-save resumes from the previous step.
"""

import glob
import json
import logging
import os
import shutil

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
BEST_DIR = "best"
ADAPTER_FILE = "adapter.safetensors"

log = logging.getLogger("jaxft")


class Checkpointer:
  def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)), force=True)

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir} has no {CONFIG_FILE}: it is not a jaxft "
                            "training directory (train into it with python -m jaxft.train)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_labels(workdir: str) -> list[str] | None:
  path = os.path.join(workdir, LABELS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_params(workdir: str, step: int | None = None, best: bool = True,
                init_from: str | None = None):
  """(resolved training config, task, model variables) of a workdir or an adapter directory:
  the best checkpoint (early stopping keeps it in workdir/best) unless `best` is False or a
  `step` is given, else the latest.

  Restores the trainable variables alone (no optimizer state), onto the first local device; a
  PEFT run's frozen base comes from its config.init_from (or `init_from`, if the base model
  has moved since).
  """
  from jaxft import init_from as init_from_lib
  from jaxft import peft, tasks

  config = load_config(workdir)
  if init_from:
    config.init_from = init_from
  task = tasks.make_task(config, labels=load_labels(workdir))
  lay, trainable = load_trainable(workdir, task, step, best)
  frozen = {}
  if lay.has_frozen:
    if not config.init_from:
      log.info("%s: no init_from recorded; the frozen base is the seed's random init", workdir)
    frozen = lay.split(init_from_lib.initial_variables(task, config, lay))[1]
  return config, task, peft.combine(frozen, trainable)


def load_trainable(workdir: str, task, step: int | None = None, best: bool = True):
  """(the variables' layout on one device, the trainable variables of the checkpoint or of
  the adapter file in `workdir`)."""
  from jaxft import sharding
  from jaxft import state as state_lib

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.local_devices()[:1])
  lay = state_lib.layout(task, task.config.seq_len, mesh, task.config.axis_rules)
  abstract, _ = lay.split(jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), lay.abstract,
      lay.shardings))
  if os.path.exists(os.path.join(workdir, ADAPTER_FILE)):
    return lay, read_adapter(workdir, abstract)
  return lay, _restore_trainable(workdir, step, best, abstract)


def _restore_trainable(workdir: str, step: int | None, best: bool, abstract):
  manager = None
  if best and step is None and os.path.isdir(os.path.join(workdir, BEST_DIR)):
    directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    if manager.latest_step() is None:  # no evaluation finished yet
      manager.close()
      manager = None
  if manager is None:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint yet under {directory}")
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract},
      restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}),
      partial_restore=True)))
  manager.close()
  # partial_restore hands back the abstract leaf for anything the checkpoint lacks.
  missing = ["/".join(map(str, k)) for k, v in
             _flat_leaves(out.state["params"]) if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"the checkpoint of step {step} in {directory} lacks {len(missing)} "
                     f"trainable variable(s) of this run's model, e.g. {missing[:4]}: it was "
                     "written for another model or by an older jaxft (before variables were "
                     "split into trainable and frozen); retrain, or load it with that version")
  return out.state["params"]


def _flat_leaves(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree).items()


# -- adapter-only files ------------------------------------------------------------------------

def save_adapter(out_dir: str, workdir: str, trainable) -> list[str]:
  """The trainable variables of a run (PEFT params and the task head) as one safetensors file,
  next to the run's config.json and labels.json: a directory that `load_params` (and so
  evaluate, predict, generate, prompt_eval and export) reads on top of its base model."""
  from safetensors.numpy import save_file

  from jaxft import peft

  os.makedirs(out_dir, exist_ok=True)
  tensors = {"/".join(k): np.ascontiguousarray(np.asarray(jax.device_get(v)))
             for k, v in peft.flat(trainable).items()}
  save_file(tensors, os.path.join(out_dir, ADAPTER_FILE))
  written = [ADAPTER_FILE]
  for name in (CONFIG_FILE, LABELS_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out_dir, name))
      written.append(name)
  return written


def read_adapter(directory: str, abstract) -> dict:
  """An adapter file checked against the model it is loaded into (names and shapes)."""
  from flax import traverse_util
  from safetensors.numpy import load_file

  from jaxft import peft

  path = os.path.join(directory, ADAPTER_FILE)
  tensors = load_file(path)
  want = {"/".join(k): v for k, v in peft.flat(abstract).items()}
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  if missing or extra:
    raise ValueError(f"{path} does not fit the model of its config.json: missing "
                     f"{missing[:6]}, unexpected {extra[:6]}; was it saved from another run?")
  for name, spec in want.items():
    if tuple(tensors[name].shape) != tuple(spec.shape):
      raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                       f"expects {tuple(spec.shape)}")
  device = jax.local_devices()[0]
  return traverse_util.unflatten_dict({
      tuple(name.split("/")): jax.device_put(tensors[name].astype(spec.dtype), device)
      for name, spec in want.items()})
