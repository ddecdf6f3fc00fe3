"""grain pipelines for causal-LM pretraining: chunks -> tokens -> packed rows -> batches.

Batch contract (every task yields these; arrays are [rows, seq_len]):
  inputs       token ids fed to the model
  targets      the next token of each input (the row shifted by one, never a sliced copy)
  loss_mask    1.0 where the target belongs to the same segment as the input, else 0.0
  positions    position within the segment (restarts at 0 at every segment start)
  segment_ids  1, 2, ... per text chunk in the row; 0 = padding (attends to nothing)

Each document starts with EOS (GPT-2's document separator), so the model learns to begin a
text from EOS; later chunks of a long document continue without one. Rows are
concatenate-then-split with an overlap of one token (a row's last target is the next row's first
input): no padding in training, and every token but a chunk's first is a target exactly once.

Training order is a seeded shuffle of the chunks, reshuffled every epoch, so it depends only on
(corpus, seed) — never on the number of processes or devices: every process builds the same
global batch and keeps its own rows. The iterator is checkpointable (grain get_state /
set_state; see PackedRows for what the packer adds), so a resumed run reads exactly the rows
it would have read.
"""

import copy
import functools
import math

import grain
import numpy as np

from jaxft.data import text_builder
from jaxft.data.tokenizer import load_tokenizer

_UNIGRAM_MAX_CHARS = 50_000_000  # fit the unigram baseline on at most this much training text


class Tokenize(grain.transforms.Map):
  """{"text": bytes, "is_doc_start": bool} -> int32 ids, EOS-prefixed at a document start."""

  def __init__(self, tokenizer_path: str):
    self._path = tokenizer_path  # grain workers rebuild the tokenizer from the path

  @functools.cached_property
  def _tok(self):
    return load_tokenizer(self._path or None)

  def map(self, record):
    text = record["text"]
    ids = self._tok.encode(text.decode("utf-8") if isinstance(text, bytes) else text)
    if record["is_doc_start"]:
      ids = [self._tok.eos_id, *ids]
    return np.asarray(ids, np.int32)


def rows_to_batch(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of seq_len + 1 tokens and their segment ids -> the batch contract (see module doc)."""
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  seg_in, seg_tgt = segments[..., :-1], segments[..., 1:]
  # Position = index minus the index where the current segment started.
  idx = np.broadcast_to(np.arange(seg_in.shape[-1]), seg_in.shape)
  starts = np.concatenate([np.ones_like(seg_in[..., :1], bool),
                           seg_in[..., 1:] != seg_in[..., :-1]], axis=-1)
  positions = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
  return {
      "inputs": inputs.astype(np.int32),
      "targets": targets.astype(np.int32),
      "loss_mask": ((seg_tgt == seg_in) & (seg_in > 0)).astype(np.float32),
      "positions": positions.astype(np.int32),
      "segment_ids": seg_in.astype(np.int32),
  }


class PackedRows(grain.IterDataset):
  """Concatenates token chunks and cuts rows of `row_len` tokens + their segment ids.

  A finite parent ends with one zero-padded row (segment id 0) holding what is left.
  """

  def __init__(self, parent: grain.IterDataset, row_len: int):
    super().__init__(parent)
    self._row_len = row_len

  def __iter__(self):
    return _PackedRowsIterator(self._parent.__iter__(), self._row_len)


class _PackedRowsIterator(grain.DatasetIterator):
  """State = (parent state before the chunk being cut, tokens of it already used).

  Restoring re-reads that one chunk from the parent; no token buffer goes into checkpoints.
  """

  def __init__(self, parent: grain.DatasetIterator, row_len: int):
    super().__init__(parent)
    self._row_len = row_len
    self._chunk_state = copy.deepcopy(parent.get_state())
    self._chunk = np.zeros((0,), np.int32)
    self._offset = 0
    self._exhausted = False

  def _next_chunk(self) -> bool:
    self._chunk_state = copy.deepcopy(self._parent.get_state())
    try:
      self._chunk = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    self._offset = 0
    return True

  def __next__(self):
    tokens = np.zeros((self._row_len,), np.int32)
    segments = np.zeros((self._row_len,), np.int32)
    filled, segment = 0, 0
    while filled < self._row_len:
      if self._offset == len(self._chunk) and (self._exhausted or not self._next_chunk()):
        break
      take = min(self._row_len - filled, len(self._chunk) - self._offset)
      if take == 0:
        continue  # an empty chunk
      segment += 1
      tokens[filled:filled + take] = self._chunk[self._offset:self._offset + take]
      segments[filled:filled + take] = segment
      filled += take
      self._offset += take
    if filled == 0:
      raise StopIteration
    if filled == self._row_len:
      # The next row starts with this row's last token (overlap of one), so every token is a
      # target exactly once: the row's last target is the next row's first input.
      self._offset -= 1
    return tokens, segments

  def get_state(self):
    return {"parent": copy.deepcopy(self._chunk_state), "offset": self._offset}

  def set_state(self, state):
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._chunk_state = copy.deepcopy(state["parent"])
    self._chunk, self._offset, self._exhausted = np.zeros((0,), np.int32), 0, False
    if state["offset"] > 0:
      self._next_chunk()
      self._offset = state["offset"]


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of every global batch (each process builds the same global batch)."""
  if global_batch_size % process_count:
    raise ValueError(f"config.batch_size={global_batch_size} must divide by the number of JAX "
                     f"processes ({process_count})")
  per = global_batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _to_batch(rows, keep: slice):
  tokens, segments = (np.stack(x) for x in zip(*rows))
  return rows_to_batch(tokens[keep], segments[keep])


def train_iterator(data_cfg, *, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
  """An endless, checkpointable iterator of this process's rows of each global batch."""
  source = text_builder.data_sources(data_cfg)["train"]
  keep = process_rows(global_batch_size, process_index, process_count)
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat(None)  # reshuffled every epoch (the shuffle seed advances with the epoch)
        .map(Tokenize(data_cfg.tokenizer))
        .to_iter_dataset())
  ds = PackedRows(ds, seq_len + 1).batch(global_batch_size, drop_remainder=True,
                                         batch_fn=functools.partial(_to_batch, keep=keep))
  return iter(ds)


def eval_batches(data_cfg, *, seq_len: int, global_batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The validation split in order, packed like training; the last batch is padded with
  empty rows (loss_mask 0) so every batch has the same shape. The same list every call."""
  source = text_builder.data_sources(data_cfg)["validation"]
  keep = process_rows(global_batch_size, process_index, process_count)
  ds = grain.MapDataset.source(source).map(Tokenize(data_cfg.tokenizer)).to_iter_dataset()
  rows = PackedRows(ds, seq_len + 1)
  batches, current = [], []
  for row in rows:
    current.append(row)
    if len(current) == global_batch_size:
      batches.append(_to_batch(current, keep))
      current = []
      if max_batches and len(batches) == max_batches:
        break
  if current:
    pad = (np.zeros((seq_len + 1,), np.int32), np.zeros((seq_len + 1,), np.int32))
    batches.append(_to_batch(current + [pad] * (global_batch_size - len(current)), keep))
  if not batches:
    raise ValueError("the validation split is empty; give config.data.validation_files or "
                     "raise config.data.validation_fraction")
  return batches


def unigram_cross_entropy(data_cfg, batches: list[dict[str, np.ndarray]]) -> float:
  """Nats/token of a unigram model (add-one smoothed, fitted on the training split's tokens)
  on the targets `batches` score: the baseline a language model must beat."""
  tok = load_tokenizer(data_cfg.tokenizer or None)
  source = text_builder.data_sources(data_cfg)["train"]
  counts = np.zeros((tok.vocab_size,), np.int64)
  chars, step = 0, 256
  for start in range(0, len(source), step):
    records = [source[i] for i in range(start, min(start + step, len(source)))]
    texts = [r["text"].decode("utf-8") for r in records]
    for ids in tok.encode_batch(texts):
      counts += np.bincount(ids, minlength=tok.vocab_size)
    chars += sum(len(t) for t in texts)
    if chars >= _UNIGRAM_MAX_CHARS:
      break
  log_p = np.log(counts + 1.0) - math.log(counts.sum() + tok.vocab_size)
  total, n = 0.0, 0.0
  for b in batches:
    mask = b["loss_mask"] > 0
    total -= float(log_p[b["targets"][mask]].sum())
    n += float(mask.sum())
  return total / max(n, 1.0)
