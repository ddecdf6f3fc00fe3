"""Fixed-shape device calls for served encoders: featurised rows of any count and length run
through one jitted function in a few (batch rows, sequence length) bucket shapes, all compiled
at start-up (`warmup`), so that no request ever waits for a compilation.

Rows arrive featurised at the model's full row length (`max_len`, the length jaxft.predict
pads to, so truncation and QA windows are predict's); they are right-padded, so a row whose
real tokens fit in a shorter bucket is cut to it without losing anything. Attention never sees
padding (segment id 0), so the real tokens' outputs are those of the full-length row. Rows are
grouped by their sequence bucket, each group split into chunks of at most the largest batch
bucket, and each chunk padded with empty rows (example_mask 0, no real tokens) up to the
smallest batch bucket that holds it. Per-token outputs are padded back to `max_len`, so that
the tasks' own post-processing reads them exactly as it reads predict's.
"""

import threading
from collections.abc import Sequence

import jax
import numpy as np

# Per-token device arrays of every featurised row (besides a task's own token_batch_keys).
TOKEN_KEYS = ("inputs", "segment_ids", "token_types", "positions")


def default_seq_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` below max_len, and max_len itself."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return (*out, max_len)


def default_batch_buckets(max_batch: int) -> tuple[int, ...]:
  """1, 4, 16, ... below max_batch, and max_batch: a lone request pays for one row, a burst
  fills the largest bucket, and only a handful of shapes compile."""
  out, b = [], 1
  while b < max_batch:
    out.append(b)
    b *= 4
  return (*out, max_batch)


def check_buckets(name: str, buckets: Sequence[int], top: int, top_name: str) -> tuple[int, ...]:
  buckets = tuple(sorted({int(b) for b in buckets}))
  if not buckets or buckets[0] < 1:
    raise ValueError(f"{name}={buckets} must be positive sizes")
  if buckets[-1] != top:
    raise ValueError(f"{name}={buckets} must end at {top_name}={top} (the longest row must fit "
                     "a bucket, and no bucket may be larger)")
  return buckets


class BucketRunner:
  """`fn(variables, batch)` (jitted here) over featurised rows in bucket shapes only."""

  def __init__(self, fn, variables, max_len: int, *, seq_buckets: Sequence[int],
               batch_buckets: Sequence[int], token_keys: Sequence[str] = TOKEN_KEYS,
               per_token_outputs: Sequence[str] = ()):
    self._fn = jax.jit(fn)
    self._variables = variables
    self.max_len = max_len
    self.seq_buckets = check_buckets("seq_buckets", seq_buckets, max_len, "the row length")
    self.batch_buckets = tuple(sorted(set(batch_buckets)))  # checked by the service
    self._token_keys = tuple(token_keys)
    self._per_token = tuple(per_token_outputs)
    self._lock = threading.Lock()  # warmup (caller's thread) and serving (the worker) share it
    self.compiled: set[tuple[int, int]] = set()  # (rows, length) shapes warmup compiled
    self.last_rows = (0, 0)  # (real rows, bucket rows) of the last run: occupancy
    self.last_tokens = (0, 0)  # (real tokens, bucket tokens) of the last run
    self.device_calls = 0

  def cache_size(self) -> int:
    """Programs the jitted function holds: one per shape it has compiled."""
    return self._fn._cache_size()  # noqa: SLF001 (jax's own count of compiled shapes)

  def warmup(self, sample: dict[str, np.ndarray]) -> None:
    """Compiles every (batch bucket, sequence bucket) shape, from featurised `sample` rows
    (the dtypes and keys requests will have; its first row is used)."""
    one = {k: v[:1] for k, v in sample.items()}
    for rows in self.batch_buckets:
      for length in self.seq_buckets:
        with self._lock:
          jax.block_until_ready(self._fn(self._variables, self._shape(one, rows, length)))
        self.compiled.add((rows, length))

  def _shape(self, rows: dict[str, np.ndarray], n: int, length: int) -> dict[str, np.ndarray]:
    """`rows` cut to `length` tokens and padded with empty rows to `n` rows."""
    out = {}
    for k, v in rows.items():
      if k in self._token_keys:
        v = v[:, :length]
      short = n - len(v)
      out[k] = np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) if short else v
    return out

  def _seq_bucket(self, length: int) -> int:
    return next(b for b in self.seq_buckets if b >= length)

  def _batch_bucket(self, n: int) -> int:
    return next(b for b in self.batch_buckets if b >= n)

  def run(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host outputs of every row, in order: per-row outputs [N, ...], per-token ones
    [N, max_len, ...] (zeros past each bucket's length). Scalar outputs (sums over a batch,
    padding rows included) are not returned."""
    n = len(rows["inputs"])
    # Real tokens of a row: its segment ids (GPT-2's empty text is one real pad token).
    lengths = np.maximum((rows["segment_ids"] > 0).sum(1), 1)
    buckets = np.asarray([self._seq_bucket(int(x)) for x in lengths])
    top = self.batch_buckets[-1]
    chunks = []
    for length in self.seq_buckets:
      index = np.flatnonzero(buckets == length)
      chunks.extend((length, index[i:i + top]) for i in range(0, len(index), top))
    outputs: dict[str, np.ndarray] = {}
    real_rows = bucket_rows = bucket_tokens = 0
    with self._lock:
      pending = [(length, index, self._fn(self._variables, self._shape(
          {k: v[index] for k, v in rows.items()}, self._batch_bucket(len(index)), length)))
          for length, index in chunks]  # all dispatched before the first is waited for
      for length, index, out in pending:
        out = jax.device_get(out)
        for k, v in out.items():
          v = np.asarray(v)
          if v.ndim == 0:
            continue
          if k not in outputs:
            shape = (n, self.max_len, *v.shape[2:]) if k in self._per_token else (n, *v.shape[1:])
            outputs[k] = np.zeros(shape, v.dtype)
          if k in self._per_token:
            outputs[k][index, :length] = v[:len(index)]
          else:
            outputs[k][index] = v[:len(index)]
        rows_here = self._batch_bucket(len(index))
        real_rows += len(index)
        bucket_rows += rows_here
        bucket_tokens += rows_here * length
      self.device_calls += len(chunks)
    self.last_rows = (real_rows, bucket_rows)
    self.last_tokens = (int(lengths.sum()), bucket_tokens)
    return outputs
