"""Resuming a run from the newest checkpoint that restores.

Before any array is read, a step's metadata must parse and carry a format this jaxft reads, and
its saved tree must be the tree this run would build (another optimizer, PEFT method or target
set is refused, naming the config fields that differ). A step that is damaged (a truncated or
missing file, unreadable metadata) is skipped with a warning, and once an older step restores,
the damaged ones are moved aside to workdir/checkpoints_damaged: never deleted, and out of
keep-N's count, so retention cannot delete the last good step because a newer broken one
exists. If no step restores, nothing is moved and one error lists every step and why.
"""

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.parallel import distributed
from jaxft.run import checkpoint
from jaxft.run import workdir as workdir_lib

log = logging.getLogger("jaxft")


class NoRestorableCheckpointError(RuntimeError):
  pass


def check_format(meta: dict, step: int, directory: str) -> None:
  """A checkpoint written by a newer jaxft in a layout this one does not know is refused."""
  fmt = meta.get("format", 0)  # 0: before checkpoints carried a format (same layout as 1)
  if not isinstance(fmt, int) or fmt > checkpoint.FORMAT:
    raise ValueError(
        f"checkpoint step {step} in {directory} has format {fmt!r}, written by jaxft "
        f"{meta.get('jaxft_version', '?')}; this jaxft ({checkpoint.jaxft_version()}) reads "
        f"formats up to {checkpoint.FORMAT}: resume with that jaxft version or a newer one")


# Config blocks whose fields decide the train state's tree besides the model's shape (checked
# first, by best.check_same_model): the PEFT method, its targets and sizes; the optimizer chain.
_STATE_BLOCKS = ("peft", "optim")


def _changed_fields(workdir: str, config) -> list[str]:
  try:
    saved = workdir_lib.load_config(workdir)
  except (FileNotFoundError, ValueError):
    return []
  out = []
  for block in _STATE_BLOCKS:
    old, new = saved.get(block) or {}, config.get(block) or {}
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        out.append(f"config.{block}.{key}={new.get(key)!r} (the checkpoints' {old.get(key)!r})")
  return out


# Input-pipeline settings the saved data-iterator position only means something under (with
# their defaults in runs saved before they existed): packing's iterator state is another tree.
_ITERATOR_FIELDS = {"packing": False, "pack_slots": 0}


def check_same_iterator(workdir: str, config, step: int) -> None:
  """The saved data position continues only the pipeline it was taken in."""
  try:
    saved = workdir_lib.load_config(workdir).get("data") or {}
  except (FileNotFoundError, ValueError):
    return
  data = config.get("data") or {}
  changed = [f"config.data.{k}={data.get(k, d)!r} (the checkpoints' {saved.get(k, d)!r})"
             for k, d in _ITERATOR_FIELDS.items() if data.get(k, d) != saved.get(k, d)]
  if changed:
    raise ValueError(
        f"--workdir={workdir} checkpoint step {step} saved its place in another input pipeline: "
        f"{', '.join(changed)}. Resume with the settings it was trained with, or train into a "
        f"new workdir with --config.init_from={workdir} to start from its weights")


def check_same_state(saved: dict[str, tuple], abstract_state, workdir: str, config,
                     step: int) -> None:
  """The saved tree (paths and shapes) must be the tree this run restores into."""
  want = {checkpoint.key_path(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if want == saved:
    return
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  reshaped = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
  what = "; ".join(f"{name}: {keys[:3]}" for name, keys in
                   (("missing", missing), ("unexpected", extra), ("other shape", reshaped))
                   if keys)
  fields = _changed_fields(workdir, config)
  cause = (f"these settings differ from the run's: {', '.join(fields)}" if fields else
           f"its train state differs from this run's ({what})")
  raise ValueError(
      f"--workdir={workdir} checkpoint step {step} holds another train state than this config "
      f"builds: {cause}. Resume with the settings it was trained with, or train into a new "
      f"workdir with --config.init_from={workdir} to start from its weights "
      f"(tree differences: {what})")


def _agree(ok: bool) -> bool:
  """Every process must take the same step: a step restores only if it did everywhere."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _why(error: BaseException) -> str:
  """The innermost cause, first line: tensorstore's "OUT_OF_RANGE: ... byte range ..." says
  more than Orbax's wrapper around it."""
  text = checkpoint.cause(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def restore_newest(ckpt: checkpoint.Checkpointer, abstract_state, data_iter, workdir: str,
                   config):
  """(state, meta, step) of the newest step that restores, or None when there is no step."""
  steps = ckpt.steps()
  if not steps:
    return None
  damaged: list[tuple[int, str]] = []
  for step in steps:
    try:
      meta = ckpt.read_meta(step)
      saved = ckpt.saved_shapes(step)
      reason = None
    except Exception as e:  # unreadable or missing metadata: damage, try the step before
      reason = _why(e)
    if _agree(reason is None):
      # A readable step with another format or tree is the config's problem, not damage.
      check_format(meta, step, ckpt.directory)
      check_same_state(saved, abstract_state, workdir, config, step)
      check_same_iterator(workdir, config, step)
      try:
        state, meta = ckpt.restore(step, abstract_state, data_iter)
      except Exception as e:  # a truncated or missing array file
        reason = _why(e)
    if _agree(reason is None):
      for bad, _ in damaged:
        where = ckpt.set_aside(bad) if distributed.is_primary() else checkpoint.DAMAGED_DIR
        log.warning("resuming from step %d; the damaged step %d was moved to %s", step, bad,
                    where)
      if damaged and jax.process_count() > 1:  # the others see the steps process 0 moved
        multihost_utils.sync_global_devices("jaxft-damaged-set-aside")
        ckpt.manager.reload()
      return state, meta, step
    damaged.append((step, reason or "failed on another process"))
    log.warning("checkpoint step %d in %s does not restore (%s); trying the one before", step,
                ckpt.directory, damaged[-1][1])
  tried = "; ".join(f"step {s}: {why}" for s, why in damaged)
  raise NoRestorableCheckpointError(
      f"no checkpoint in {ckpt.directory} restores ({tried}). Nothing was moved or deleted. "
      f"Restore the files from a backup, or move {ckpt.directory} aside to train from scratch")
