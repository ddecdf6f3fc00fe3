"""Packing labelled examples into rows: several short examples share one [seq_len] row, so a
step pays for real tokens instead of padding (config.data.packing).

Grain's first-fit packer does the work (checkpointable, so resume stays bit-exact): token
features (inputs, token_types, per-token labels) are concatenated along the row, each example
its own segment (segment ids 1, 2, ...; positions restart at 0); per-example features (a
sequence label, the example's index in its split) go into `slots` entries, entry j belonging to
segment j + 1. The attention mask from segment ids keeps examples apart, so a packed example's
outputs equal its unpacked ones (tests/test_packing.py).

A packed row carries: the token features, segment_ids, positions, the per-example features as
[slots] arrays, example_mask [slots] (1 = a real example) and example_index [slots] (-1 empty).
"""

import grain
import numpy as np
from grain import experimental as grain_experimental


def default_slots(seq_len: int) -> int:
  """Examples per row at most: one per 8 tokens (a [CLS] text [SEP] of a few words)."""
  return max(1, seq_len // 8)


class ExampleRows:
  """Random-access examples, trimmed to their real tokens, from padded [N, T] arrays."""

  def __init__(self, arrays: dict[str, np.ndarray], token_keys: tuple[str, ...],
               example_keys: tuple[str, ...]):
    self._arrays = arrays
    self._token_keys, self._example_keys = token_keys, example_keys
    self._lengths = (arrays["segment_ids"] > 0).sum(axis=1)
    self._n = len(self._lengths)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    n = int(self._lengths[i])  # >= 1: featurising gives an empty text one token
    row = {k: self._arrays[k][i, :n] for k in self._token_keys}
    row.update({k: self._arrays[k][i:i + 1] for k in self._example_keys})
    row["example_index"] = np.asarray([i], np.int32)
    return row


def pack(ds: grain.IterDataset, seq_len: int, slots: int, token_keys: tuple[str, ...],
         example_keys: tuple[str, ...], bins: int, seed: int = 0,
         shuffle_bins: bool = True) -> grain.IterDataset:
  """Examples (from ExampleRows) -> packed rows; `bins` rows are filled at once (first fit)."""
  lengths = {k: seq_len for k in token_keys}
  lengths.update({k: slots for k in (*example_keys, "example_index")})
  packed = grain_experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(lambda row: _layout(row, token_keys, example_keys))


def _layout(row: dict, token_keys, example_keys) -> dict[str, np.ndarray]:
  first = token_keys[0]
  out = {k: row[k] for k in token_keys}
  out["segment_ids"] = row[f"{first}_segment_ids"].astype(np.int32)
  out["positions"] = row[f"{first}_positions"].astype(np.int32)
  real = row["example_index_segment_ids"] > 0
  out.update({k: row[k] for k in example_keys})
  out["example_mask"] = real.astype(np.float32)
  out["example_index"] = np.where(real, row["example_index"], -1).astype(np.int32)
  return out


def pack_in_order(arrays: dict[str, np.ndarray], seq_len: int, slots: int,
                  token_keys: tuple[str, ...], example_keys: tuple[str, ...],
                  bins: int) -> dict[str, np.ndarray]:
  """A whole split packed (no shuffling): [R, ...] arrays; every example in exactly one slot."""
  ds = grain.MapDataset.source(ExampleRows(arrays, token_keys, example_keys)).to_iter_dataset()
  rows = list(pack(ds, seq_len, slots, token_keys, example_keys, bins, shuffle_bins=False))
  if rows:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  empty = {k: np.zeros((0, seq_len), arrays[k].dtype) for k in token_keys}
  empty.update({k: np.zeros((0, slots), arrays[k].dtype) for k in example_keys})
  return {**empty, "segment_ids": np.zeros((0, seq_len), np.int32),
          "positions": np.zeros((0, seq_len), np.int32),
          "example_mask": np.zeros((0, slots), np.float32),
          "example_index": np.zeros((0, slots), np.int32)}

