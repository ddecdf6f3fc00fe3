"""Orbax checkpoints: train state + grain iterator state + metadata, saved together per step.

Saves are async: Orbax copies device arrays to host before `save` returns (so donated buffers
are safe), then writes in the background; `wait()` before exit. A step directory only appears
once complete, so a run killed mid-save resumes from the previous step.
"""

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
BEST_DIR = "best"


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
    """Restores onto the shardings in `abstract_state` (any mesh) and rewinds `data_iter`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore()))
    return out.state, out.meta

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
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def save(self, step: int, params, meta: dict) -> None:
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


def load_params(workdir: str, step: int | None = None, best: bool = True):
  """(resolved training config, task, params) of a workdir: the best checkpoint (early stopping
  keeps it in workdir/best) unless `best` is False or a `step` is given, else the latest.

  Restores the params alone (no optimizer state), onto the first local device.
  """
  from jaxft import tasks  # here, not at top: tasks imports models, which need no checkpoint

  config = load_config(workdir)
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
  task = tasks.make_task(config, labels=load_labels(workdir))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0),
                                                       config.seq_len))["params"])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract)
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract},
      restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}),
      partial_restore=True)))
  manager.close()
  return config, task, out.state["params"]
