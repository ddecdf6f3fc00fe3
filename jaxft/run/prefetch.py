"""Input overlapped with compute: the next training batches are read, tokenised, packed and put
on the devices (as global arrays with the batch sharding) on a background thread while the
current step runs.

grain's ThreadPrefetchDatasetIterator does the threading and keeps, with every prepared batch,
the iterator state right after it: a checkpoint taken after step k records the position after
batch k, never the batches prepared ahead, so resume stays bit-exact. `wait_s` counts the time
the training loop spent waiting for a batch that was not ready yet: input-bound time.
"""

import time

import grain
from grain import experimental as grain_experimental

from jaxft.parallel import sharding

# Batches prepared ahead of the step that consumes them: one in flight to the device while the
# next is being read keeps the device fed; more would only hold memory.
DEPTH = 2


class _OnDevice(grain.DatasetIterator):
  """This process's host batches of `parent` as global arrays with `batch_sharding`."""

  def __init__(self, parent: grain.DatasetIterator, batch_sharding):
    super().__init__(parent)
    self._batch_sharding = batch_sharding

  def __next__(self):
    return sharding.global_batch(next(self._parent), self._batch_sharding)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class DeviceBatches(grain.DatasetIterator):
  """A checkpointable iterator of on-device batches prepared `depth` ahead (see module doc)."""

  def __init__(self, parent: grain.DatasetIterator, batch_sharding, depth: int = DEPTH):
    self._ahead = grain_experimental.ThreadPrefetchDatasetIterator(
        _OnDevice(parent, batch_sharding), depth)
    super().__init__(self._ahead)
    self.wait_s = 0.0

  def __next__(self):
    start = time.perf_counter()
    batch = next(self._ahead)
    self.wait_s += time.perf_counter() - start
    return batch

  def get_state(self):
    return self._ahead.get_state()

  def set_state(self, state):
    self._ahead.set_state(state)  # stops the thread and drops the batches prepared ahead

  def close(self):
    self._ahead.close()
