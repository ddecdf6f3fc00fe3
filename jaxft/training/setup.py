"""Everything a run needs before its first step: the resolved config, the mesh, the task and its
data, the optimizer, the train state (new, or restored from the workdir's newest checkpoint)
and the jitted steps. Errors a user can cause (bad config, missing data, a mesh that does not
divide the batch, another model in the workdir) surface here, before any compilation."""

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from jaxft import tasks, trees
from jaxft.data.tokenizer import load_tokenizer
from jaxft.parallel import distributed, sharding
from jaxft.run import checkpoint, distill, ewc, loader, optim, prefetch, steps
from jaxft.run import state as state_lib
from jaxft.run import workdir as workdir_lib
from jaxft.training import best, resume

log = logging.getLogger("jaxft")


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  task: tasks.Task
  layout: state_lib.Layout
  tx: Any
  shardings: state_lib.TrainState
  state: state_lib.TrainState
  frozen: dict  # the variables that never train (a PEFT run's base), beside the state
  aux: dict  # the train step's inputs that are not the model's (a distillation teacher)
  meta: dict  # the restored checkpoint's metadata ({} for a new run)
  ckpt: checkpoint.Checkpointer
  train_iter: Any  # run/prefetch.DeviceBatches: on-device batches, checkpointable
  eval_batches: list
  train_step: Any
  eval_step: Any
  batch_sharding: Any
  num_steps: int
  eval_every: int
  checkpoint_every: int
  base_fingerprint: float

  @property
  def step_frozen(self) -> dict:
    """The train step's `frozen` argument: the frozen variables, and the AUX inputs."""
    return {**self.frozen, steps.AUX: self.aux} if self.aux else self.frozen

  @property
  def process(self) -> dict:
    return dict(process_index=jax.process_index(), process_count=jax.process_count())


def check_vocab(config) -> None:
  tok = load_tokenizer(config.data.tokenizer or None)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer ({config.data.tokenizer or 'GPT-2 BPE'}) has "
                     f"{tok.vocab_size} tokens but config.model.vocab_size="
                     f"{config.model.vocab_size}: raise config.model.vocab_size to at least "
                     f"{tok.vocab_size} or use the model's own tokenizer")


def num_steps(config, task) -> int:
  """config.num_steps, or config.num_epochs passes over the training examples."""
  epochs = config.get("num_epochs", 0)
  if config.num_steps > 0 or not epochs:
    return int(config.num_steps)
  n = task.num_train_examples()
  if n is None:
    raise ValueError(f"config.num_epochs={epochs} needs a task with a fixed training set; "
                     f"{config.task} streams text: set config.num_steps instead")
  return max(1, int(epochs * n) // config.batch_size)


def eval_every(config, task) -> int:
  if config.eval_every > 0:
    return int(config.eval_every)
  n = task.num_train_examples()  # 0 = once per epoch
  return max(1, (n or config.batch_size) // config.batch_size)


def make_mesh(config, devices=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_divisible(config.batch_size, config.grad_accum_steps, mesh,
                                 config.axis_rules)
  return mesh


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """A new run, or the resumption of the one in `workdir` at its newest checkpoint that
  restores (jaxft/training/resume.py). The caller holds the workdir's lock (run/lock.py)."""
  os.makedirs(workdir, exist_ok=True)
  config = loader.resolve(config)
  mesh = make_mesh(config)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    return _setup(config, workdir, mesh, ckpt)
  except BaseException:
    ckpt.close(quiet=True)  # a refused resume must not leave Orbax's threads behind
    raise


def _setup(config, workdir: str, mesh, ckpt: checkpoint.Checkpointer) -> Setup:
  resuming = bool(ckpt.steps())
  # A resumed run keeps the label order it was trained with (labels.json).
  labels = workdir_lib.load_labels(workdir) if resuming else None
  if resuming:
    best.check_same_model(workdir, config)
  # Data first: a missing corpus or a bad label should fail before any compilation. One
  # process builds the dataset (a shared TFDS directory), then the others read it.
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  with distributed.primary_first("data"):
    task = tasks.make_task(config, labels=labels)
    check_vocab(config)
    if task.needs_start:
      task.splits  # noqa: B018 (built here, by one process first)
  lay = state_lib.layout(task, config.seq_len, mesh, config.axis_rules)
  start = None  # the starting variables, when already loaded
  if task.needs_start:  # e.g. DPO's reference log-probs, before its batches are made
    start = None if resuming else loader.initial_variables(task, config, lay)
    task.prepare(workdir, start)
  # The teacher is checked before compiling anything: a wrong one fails here. Cached logits
  # join the training rows, so they come before the iterator.
  teacher = distill.make_teacher(config, task, mesh)
  if teacher is not None and distill.settings(config).cache:
    distill.cache_logits(teacher, task, workdir, resuming, mesh, config.axis_rules)
  # Prepared on a background thread and put on the devices while the step before runs.
  train_iter = prefetch.DeviceBatches(task.train_iterator(config.data.shuffle_seed, **proc),
                                      sharding.batch_sharding(mesh, config.axis_rules))
  eval_batches = task.eval_batches("validation", **proc)
  steps_total = num_steps(config, task)
  every = eval_every(config, task)
  distilling = distill.settings(config)
  tx, schedule = optim.make_optimizer(config.optim, steps_total, task.peft,
                                      ema_decay=distilling.ema_decay if distilling else 0.0)

  shardings = state_lib.state_shardings(lay, tx, mesh)
  restored = resume.restore_newest(ckpt, state_lib.abstract_state(lay, tx, shardings),
                                   train_iter, workdir, config) if resuming else None
  if restored is None:
    meta = {}
    state, frozen, _, _ = state_lib.create_train_state(
        task, tx, seq_len=config.seq_len, seed=config.seed, mesh=mesh,
        axis_rules=config.axis_rules,
        variables=start if start is not None else loader.initial_variables(task, config, lay))
  else:
    state, meta, latest = restored
    log.info("resumed from step %d in %s", latest, ckpt.directory)
    # The frozen base is not in checkpoints: rebuilt from config.init_from (or the seed).
    frozen = (lay.split(loader.initial_variables(task, config, lay))[1] if lay.has_frozen
              else {})
    best.check_base(meta, frozen, config)
    if distributed.is_primary():  # the steps after the checkpoint are logged again
      workdir_lib.truncate_metrics(workdir, latest)
  if distributed.is_primary():
    if task.labels:
      workdir_lib.save_labels(workdir, task.labels)
    workdir_lib.save_config(workdir, config)
    workdir_lib.write_run_info(workdir)
  ewc_state, ewc_sh = ewc.step_inputs(config, lay)
  train_step, eval_step, batch_sh, _ = steps.jit_steps(task, tx, schedule, config, lay,
                                                       shardings, mesh, teacher, ewc_sh)
  aux = distill.aux_inputs(teacher)[0]
  if ewc_state is not None:
    aux["ewc"] = ewc_state
  return Setup(config=config, workdir=workdir, mesh=mesh, task=task, layout=lay, tx=tx,
               shardings=shardings, state=state, frozen=frozen, aux=aux, meta=meta, ckpt=ckpt,
               train_iter=train_iter, eval_batches=eval_batches, train_step=train_step,
               eval_step=eval_step, batch_sharding=batch_sh, num_steps=steps_total,
               eval_every=every, checkpoint_every=int(config.checkpoint_every) or every,
               base_fingerprint=state_lib.fingerprint(frozen))


def parameter_counts(state, frozen) -> dict:
  """Total / trainable parameters and the optimizer state's bytes (it scales with the
  trainable count: the point of PEFT)."""
  trainable = trees.count(state.params)
  total = trainable + trees.count(frozen)
  return {"params/total": total, "params/trainable": trainable,
          "params/trainable_percent": 100.0 * trainable / max(total, 1),
          "optimizer/state_bytes": trees.nbytes(state.opt_state)}
