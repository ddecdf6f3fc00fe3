"""One stage of a continual-learning run: its config (which classes, which starting weights,
which EWC file or replay buffer) and what it leaves for the next stage (the EWC Fisher, the
replay buffer), written into the stage's workdir on demand.

Strategies:
  naive   full fine-tuning, each stage from the previous stage's weights
  ewc     naive + the EWC penalty of all earlier stages (jaxft/run/ewc.py)
  replay  naive + a reservoir buffer of earlier stages' training examples mixed into each epoch
          (jaxft/data/replay.py)
  lora    one LoRA adapter (and head) per stage on the same frozen base, task identity known
          at test time: stage i's classes are scored by stage i's adapter
"""

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from jaxft import tasks
from jaxft.data import replay
from jaxft.run import ewc, loader

STRATEGIES = ("naive", "ewc", "replay", "lora")


@dataclasses.dataclass(frozen=True)
class Options:
  strategy: str = "naive"
  # Lambda of the EWC penalty: a converged model's empirical Fisher is small (BBC News after
  # one epoch: trace 46 over 22.7M params), so useful values are large (docs: 1e4 did nothing).
  ewc_weight: float = 1e7
  fisher_examples: int = 256  # training examples of a stage the Fisher is estimated on
  replay_ratio: float = 0.2  # fraction of each later epoch drawn from the buffer
  replay_size: int = 200  # reservoir capacity (examples)

  def check(self) -> None:
    if self.strategy not in STRATEGIES:
      raise ValueError(f"--strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if self.strategy == "ewc" and not (self.ewc_weight > 0 and self.fisher_examples > 0):
      raise ValueError("--strategy=ewc needs --ewc_weight > 0 and --fisher_examples > 0")
    if self.strategy == "replay" and not (0 < self.replay_ratio < 1 and self.replay_size > 0):
      raise ValueError(f"--strategy=replay needs --replay_ratio in (0, 1) (got "
                       f"{self.replay_ratio}) and --replay_size > 0 (got {self.replay_size})")


def stage_dirs(root: str, strategy: str, t: int) -> list[str]:
  """Each stage's workdir. The full fine-tuning strategies share stage 0 (<root>/stage_0: the
  same config, so the same run, trained once); their later stages and every LoRA stage are
  <root>/<strategy>/stage_k."""
  own = [os.path.join(root, strategy, f"stage_{k}") for k in range(t)]
  return own if strategy == "lora" else [os.path.join(root, "stage_0"), *own[1:]]


def stage_config(base: ml_collections.ConfigDict, dirs: list[str], k: int,
                 stages: list[list[str]], labels: list[str],
                 opts: Options) -> ml_collections.ConfigDict:
  """Stage k's training config: its classes' examples only, the head over all labels."""
  c = base.copy_and_resolve_references()
  c.data.labels = ",".join(labels)
  c.data.label_subset = ",".join(stages[k])
  if opts.strategy == "lora":
    c.peft.method = "lora"  # from the same base every stage: isolation
    return c
  if base.peft.method != "none":
    raise ValueError(f"--strategy={opts.strategy} fine-tunes the whole model; the base config "
                     f"has config.peft.method={base.peft.method!r}: set it to 'none' (or use "
                     "--strategy=lora)")
  if k > 0:
    previous = dirs[k - 1]
    c.init_from = previous
    if opts.strategy == "ewc":
      c.continual.ewc_file = os.path.join(previous, ewc.FILE)
      c.continual.ewc_weight = float(opts.ewc_weight)
    if opts.strategy == "replay":
      c.continual.replay_file = os.path.join(previous, replay.FILE)
      c.continual.replay_ratio = float(opts.replay_ratio)
  return c


def own_data_task(config: ml_collections.ConfigDict, labels: list[str], subset: list[str]):
  """A task over `subset`'s examples of config's data, without replay (evaluation, the Fisher,
  the buffer all read a stage's own examples)."""
  c = config.copy_and_resolve_references()
  c.data.label_subset = ",".join(subset)
  if "continual" in c:
    c.continual.replay_file = ""
    c.continual.replay_ratio = 0.0
  return tasks.make_task(c, labels=labels)


def write_ewc(dirs: list[str], k: int, config, labels, stages, opts: Options) -> str:
  """stage_k/ewc.npz: stage k's Fisher (on up to fisher_examples of its training examples, a
  seeded choice) added to the earlier stages' (online EWC: jaxft/run/ewc.py accumulate),
  anchored at stage k's best params."""
  path = os.path.join(dirs[k], ewc.FILE)
  if os.path.exists(path):  # made by an earlier run (same --fisher_examples: see the docs)
    return path
  run = loader.open_run(dirs[k])
  task = own_data_task(run.config, labels, stages[k])
  f = task.features("train")
  n = len(f["inputs"])
  pick = np.sort(np.random.default_rng(int(config.seed)).permutation(n)[:opts.fisher_examples])
  batches = task.batches(task.device_arrays({key: v[pick] for key, v in f.items()}))
  fisher = ewc.fisher_diagonal(task, run.variables, batches)
  previous = ewc.load(config.continual.ewc_file) if config.continual.ewc_file else None
  anchor = jax.tree.map(np.asarray, run.variables["params"])
  state = ewc.accumulate(previous, fisher, anchor)
  ewc.save(path, state["fisher"], state["anchor"])
  return path


def write_replay(dirs: list[str], k: int, config, labels, stages, opts: Options) -> str:
  """stage_k/replay.jsonl: the reservoir over stages 0..k's training examples (stage k's
  continues stage k-1's buffer, so the buffer samples the whole stream uniformly)."""
  path = os.path.join(dirs[k], replay.FILE)
  if os.path.exists(path):
    made = replay.Reservoir.load(path, 0).capacity
    if made != opts.replay_size:
      raise ValueError(f"{path} is a buffer of {made} examples, not --replay_size="
                       f"{opts.replay_size}: rerun with --replay_size={made}, or use a new "
                       "--workdir")
    return path
  seed = int(config.seed)
  previous = config.continual.replay_file
  buffer = (replay.Reservoir.load(previous, seed) if previous
            else replay.Reservoir(opts.replay_size, seed))
  task = own_data_task(config, labels, stages[k])
  buffer.extend(task.splits["train"]).save(path)
  return path
