"""Experience replay for continual learning (docs/continual-learning.md): a reservoir buffer over
the stream of earlier stages' training examples, saved as JSONL, and the mixing of its examples
into a later stage's training split.

The buffer is Vitter's Algorithm R: the first `capacity` examples fill it; the n-th example
after that (0-based n >= capacity) replaces a uniformly drawn slot with probability
capacity / (n + 1). After any prefix of the stream every example seen so far is in the buffer
with the same probability, capacity / seen: the buffer is a uniform sample of all earlier
stages, however long each stage was. A buffer saved after one stage is continued by the next
(its `seen` count travels with it in the file's first line).

Mixing is drawn once per stage and deterministic: a stage with n examples of its own and replay
ratio r trains on round(r / (1 - r) * n) buffer examples beside them (a seeded choice, cycling
the buffer when it holds fewer), the same ones every epoch, so a fraction r of every epoch
comes from the buffer. The mixed
list is the training split grain shuffles, so a resumed stage continues bit-exactly from its
iterator state, as any run does.
"""

import json
import os

import numpy as np

FILE = "replay.jsonl"


class Reservoir:
  """Algorithm R over a stream of JSON-able examples, seeded."""

  def __init__(self, capacity: int, seed: int, items: list | None = None, seen: int = 0):
    if capacity < 1:
      raise ValueError(f"replay buffer size {capacity} must be >= 1 (--replay_size)")
    self.capacity = int(capacity)
    self.items = list(items or [])
    self.seen = int(seen)
    if len(self.items) != min(self.seen, self.capacity):
      raise ValueError(f"a replay buffer of capacity {capacity} that has seen {seen} examples "
                       f"must hold {min(seen, capacity)}, not {len(self.items)}")
    # A continued buffer draws from a generator keyed by (seed, seen): the next stage's draws
    # differ from the previous stage's, and rerunning a stage redraws the same.
    self._rng = np.random.default_rng([int(seed), self.seen])

  def add(self, example) -> None:
    if len(self.items) < self.capacity:
      self.items.append(example)
    else:
      j = int(self._rng.integers(0, self.seen + 1))  # uniform over 0..seen inclusive
      if j < self.capacity:
        self.items[j] = example
    self.seen += 1

  def extend(self, examples) -> "Reservoir":
    for e in examples:
      self.add(e)
    return self

  def save(self, path: str) -> None:
    """JSONL: a header line {"capacity", "seen"}, then one raw example per line."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(json.dumps({"capacity": self.capacity, "seen": self.seen}) + "\n")
      for e in self.items:
        f.write(json.dumps(e) + "\n")
    os.replace(tmp, path)  # a killed save never leaves half a buffer behind

  @classmethod
  def load(cls, path: str, seed: int) -> "Reservoir":
    header, items = read_file(path, with_header=True)
    return cls(header["capacity"], seed, items, header["seen"])


def read_file(path: str, with_header: bool = False):
  """The examples of a saved buffer (and its header)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.continual.replay_file={path!r} does not exist; give a "
                            f"{FILE} a continual-learning stage wrote, or '' for no replay")
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  try:
    header = json.loads(lines[0]) if lines else {}
    items = [json.loads(line) for line in lines[1:]]
  except json.JSONDecodeError as e:
    raise ValueError(f"config.continual.replay_file={path!r} is not a replay buffer (JSONL): "
                     f"{e}") from e
  if "seen" not in header or "capacity" not in header:
    raise ValueError(f"config.continual.replay_file={path!r} lacks the header line "
                     '{"capacity", "seen"} a replay buffer starts with')
  return (header, items) if with_header else items


def replay_count(n_own: int, ratio: float) -> int:
  """Buffer examples per epoch so that they are `ratio` of it beside n_own examples."""
  if not 0 <= ratio < 1:
    raise ValueError(f"config.continual.replay_ratio={ratio} must be in [0, 1) (the fraction "
                     "of each epoch drawn from the replay buffer)")
  return int(round(ratio / (1 - ratio) * n_own))


def mix(own, buffer: list, ratio: float, seed: int) -> list:
  """own's examples followed by replay_count(len(own), ratio) buffer examples (each buffer
  example once per pass over the buffer, passes in seeded orders). grain shuffles the result."""
  own = list(own)
  k = replay_count(len(own), ratio)
  if k == 0:
    return own
  if not buffer:
    raise ValueError("config.continual.replay_file holds no examples; with replay_ratio > 0 "
                     "the buffer must hold some")
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(buffer)) for _ in range(-(-k // len(buffer)))])
  return own + [buffer[int(i)] for i in order[:k]]
