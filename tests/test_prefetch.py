"""run/prefetch.DeviceBatches: batches prepared on a background thread, put on the devices with
the batch sharding, checkpointed at the position of the batches consumed (not prepared)."""

import time

import grain
import jax
import numpy as np

from jaxft.run import prefetch


class _Rows(grain.DatasetIterator):
  """Batch i = {"inputs": [8, 4] filled with i}; `delay` seconds to prepare each."""

  def __init__(self, delay: float = 0.0):
    super().__init__()
    self.i, self.delay = 0, delay

  def __next__(self):
    time.sleep(self.delay)
    batch = {"inputs": np.full((8, 4), self.i, np.int32)}
    self.i += 1
    return batch

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _batch_sharding():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def test_batches_arrive_sharded_and_a_checkpoint_holds_the_consumed_position():
  batch_sharding = _batch_sharding()
  rows = _Rows()
  it = prefetch.DeviceBatches(rows, batch_sharding)
  for i in range(3):
    batch = next(it)
    assert isinstance(batch["inputs"], jax.Array)
    assert batch["inputs"].sharding.is_equivalent_to(batch_sharding, 2)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), np.full((8, 4), i))
  time.sleep(0.2)
  assert rows.i >= 5  # the thread has prepared batches 3 and 4 ahead
  state = it.get_state()
  assert state == {"i": 3}
  it.close()
  resumed = prefetch.DeviceBatches(_Rows(), batch_sharding)
  resumed.set_state(state)
  assert [int(next(resumed)["inputs"][0, 0]) for _ in range(2)] == [3, 4]
  resumed.close()


def test_the_next_batch_is_prepared_while_the_step_runs():
  """Each batch takes 0.1 s to prepare and each 'step' 0.1 s: prepared ahead, the loop waits
  for the first batch only (a sequential pipeline would wait 0.1 s before every step)."""
  it = prefetch.DeviceBatches(_Rows(delay=0.1), _batch_sharding())
  for _ in range(8):
    next(it)
    time.sleep(0.1)  # the train step
  assert it.wait_s < 0.4, it.wait_s  # sequential: 0.8 s
  it.close()
