"""A generic dynamic micro-batcher: concurrent requests' items grouped into one batch per call
of a processing function, on one background worker thread.

Requests come from asyncio handlers (`submit`) or any thread (`submit_future`); each carries a
key (the endpoint) and a list of items. The worker takes the key whose oldest item waited
longest, waits until `max_batch` items of that key are queued or that oldest item has waited
`max_wait_ms`, then calls `process(key, items)` -> one result per item, and completes every
request whose items are all done. Items of one key only share a batch (an endpoint's outputs
differ from another's); a request bigger than `max_batch` spans several batches.

Back-pressure: at most `max_queue` items wait; a request that would overflow raises QueueFull
at once (HTTP 429), one that could never fit raises ValueError (HTTP 400).
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("jaxft")


class QueueFull(Exception):
  """max_queue items are already waiting: the caller should retry later (HTTP 429)."""


class Stopped(RuntimeError):
  """The batcher is not running (never started, stopping or stopped): HTTP 503."""


@dataclasses.dataclass
class _Request:
  items: list
  future: concurrent.futures.Future
  results: list
  remaining: int


@dataclasses.dataclass
class _Entry:
  request: _Request
  index: int  # the item's position in its request
  arrived: float  # time.monotonic() when queued


class MicroBatcher:
  """Groups items of concurrent requests into batches of at most `max_batch` items, waiting at
  most `max_wait_ms` after the oldest queued item for more to arrive."""

  def __init__(self, process: Callable[[str, list], Sequence], *, max_batch: int = 32,
               max_wait_ms: float = 5.0, max_queue: int = 256, name: str = "batcher"):
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch} must be >= 1")
    if max_wait_ms < 0:
      raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
    if max_queue < max_batch:
      raise ValueError(f"max_queue={max_queue} must be >= max_batch={max_batch}")
    self._process = process
    self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
    self._name = name
    self._queues: dict[str, collections.deque[_Entry]] = collections.defaultdict(
        collections.deque)
    self._waiting = 0  # items in the queues (not the batch being processed)
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._accepting = False
    self._drain = True
    self._batches = 0
    self._items_done = 0
    self._last_batch = 0

  # -- life cycle ------------------------------------------------------------------------------

  def start(self) -> None:
    with self._cond:
      if self._thread is not None:
        raise RuntimeError(f"{self._name} is already started")
      self._accepting, self._drain = True, True
      self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
      self._thread.start()

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Refuses new requests; with `drain` the queued items are still processed (at once, not
    waiting for max_wait), else their requests fail with Stopped. Joins the worker."""
    with self._cond:
      thread, self._accepting, self._drain = self._thread, False, drain
      if not drain:
        self._fail_queued(Stopped(f"{self._name} stopped before this request ran"))
      self._cond.notify_all()
    if thread is not None:
      thread.join(timeout)
    with self._cond:
      self._thread = None

  @property
  def running(self) -> bool:
    return self._accepting

  # -- submitting ------------------------------------------------------------------------------

  def submit_future(self, key: str, items: Sequence) -> concurrent.futures.Future:
    """Queues `items` under `key`; the future's result is the list of their results, in order."""
    items = list(items)
    if not items:
      raise ValueError("the request holds no items; give at least one input")
    if len(items) > self.max_queue:
      raise ValueError(f"the request holds {len(items)} inputs, more than the server's queue "
                       f"({self.max_queue}); split it into smaller requests")
    future: concurrent.futures.Future = concurrent.futures.Future()
    request = _Request(items, future, [None] * len(items), len(items))
    now = time.monotonic()
    with self._cond:
      if not self._accepting:
        raise Stopped(f"{self._name} is not running (not started, or shutting down)")
      if self._waiting + len(items) > self.max_queue:
        raise QueueFull(f"{self._waiting} inputs are queued and the limit is {self.max_queue}; "
                        "retry later")
      self._queues[key].extend(_Entry(request, i, now) for i in range(len(items)))
      self._waiting += len(items)
      self._cond.notify_all()
    return future

  async def submit(self, key: str, items: Sequence) -> list:
    """submit_future awaited from an asyncio handler (cancelling it drops the request's items
    that have not run yet)."""
    return await asyncio.wrap_future(self.submit_future(key, items))

  def stats(self) -> dict:
    with self._cond:
      return {"queue_depth": self._waiting, "batches": self._batches,
              "items_done": self._items_done, "last_batch_items": self._last_batch}

  # -- the worker ------------------------------------------------------------------------------

  def _oldest_key(self) -> str | None:
    heads = [(q[0].arrived, k) for k, q in self._queues.items() if q]
    return min(heads)[1] if heads else None

  def _next_batch(self) -> tuple[str, list[_Entry]] | None:
    """Blocks until a batch is due; None when stopping with nothing (left) to do."""
    with self._cond:
      while True:
        key = self._oldest_key()
        if key is None:
          if not self._accepting:
            return None
          self._cond.wait()
          continue
        queue = self._queues[key]
        due = queue[0].arrived + self.max_wait
        flushing = not self._accepting  # draining: no reason to wait for more
        if len(queue) >= self.max_batch or flushing or time.monotonic() >= due:
          entries = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
          self._waiting -= len(entries)
          # A cancelled request's items (its client went away) are not computed.
          return key, [e for e in entries if not e.request.future.cancelled()]
        self._cond.wait(max(0.0, due - time.monotonic()))

  def _work(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      key, entries = batch
      if not entries:
        continue
      try:
        results = list(self._process(key, [e.request.items[e.index] for e in entries]))
        if len(results) != len(entries):
          raise RuntimeError(f"{self._name}: processing {len(entries)} items returned "
                             f"{len(results)} results")
      except Exception as e:  # noqa: BLE001 (the requests carry it to their handlers)
        log.exception("%s: a batch of %d %r items failed", self._name, len(entries), key)
        for entry in entries:
          _settle(entry.request.future, error=e)
        results = None
      with self._cond:
        self._batches += 1
        self._last_batch = len(entries)
        self._items_done += len(entries)
      if results is None:
        continue
      for entry, result in zip(entries, results):
        request = entry.request
        request.results[entry.index] = result
        request.remaining -= 1
        if request.remaining == 0:
          _settle(request.future, result=request.results)

  def _fail_queued(self, error: Exception) -> None:
    for queue in self._queues.values():
      while queue:
        _settle(queue.popleft().request.future, error=error)
    self._waiting = 0


def _settle(future: concurrent.futures.Future, result=None, error: Exception | None = None):
  """Completes `future` unless it already is (cancelled by its client, or failed earlier)."""
  try:
    if error is not None:
      future.set_exception(error)
    else:
      future.set_result(result)
  except concurrent.futures.InvalidStateError:
    pass
