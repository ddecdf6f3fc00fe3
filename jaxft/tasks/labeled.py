"""What the fine-tuning tasks (classification, NER, QA) share: labelled splits from the TFDS
builder (jaxft/data/labeled.py), the label set, featurised splits held as arrays, a grain
training iterator over them and fixed-shape evaluation batches.

A split is featurised once into a dict of [N, ...] arrays (tokenising a few thousand examples
with the Rust tokenizer takes well under a second); grain shuffles its rows every epoch and the
iterator state is checkpointed with the model, as for pretraining. Evaluation batches keep the
split's order and pad the last batch with rows whose example_mask is 0.

With config.data.packing several examples share a row (jaxft/data/packing.py): training packs
each epoch's shuffled examples, evaluation and predict pack the split in order, and outputs
carry example_index (and, for per-token outputs, segment_ids) to map each slot, or each
segment's tokens, back to its example.

With config.augment on (jaxft/data/augment.py; docs/augmentation.md) training reads the raw
examples instead: each one is augmented per (seed, epoch, example index, copy) and featurised
in the iterator, so the iterator state alone still resumes it bit-exactly; evaluation, test
and predict never see augmented text. config.data.train_fraction keeps a seeded subset of the
training split (validation and test are carved first, so they do not change).
"""

import abc
import functools
import logging

import grain
import ml_collections
import numpy as np
from grain import experimental as grain_experimental

from jaxft.data import augment, continual, labeled, packing, pipeline
from jaxft.data.tokenizer import load_tokenizer
from jaxft.tasks.base import Task

log = logging.getLogger("jaxft")


class ArrayRows:
  """Random-access rows of a dict of equally long arrays (a grain MapDataset source)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self._n = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._arrays.items()}


def train_subset(source, fraction: float, seed: int):
  """config.data.train_fraction of the training examples, a seeded choice kept in split order."""
  if not 0 < fraction <= 1:
    raise ValueError(f"config.data.train_fraction={fraction} must be in (0, 1] (1 = the whole "
                     "training split)")
  if fraction == 1:
    return source
  n = len(source)
  keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, round(fraction * n))])
  return [source[int(i)] for i in keep]


# Augmenting and tokenising a batch costs real CPU time: grain's default read-ahead (16
# threads, 500 elements) would race the train step for the cores; run/prefetch.py already
# prepares the next batches beside the step.
_AUGMENT_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


class _Unbatch(grain_experimental.FlatMapTransform):
  """A list of examples back to its elements (featurising a batch at once is much cheaper)."""

  def __init__(self, max_fan_out: int):
    self.max_fan_out = max_fan_out

  def flat_map(self, element):
    return element


def _rows_of_process(batch: dict[str, np.ndarray], keep: slice) -> dict[str, np.ndarray]:
  return {k: v[keep] for k, v in batch.items()}


class LabeledTask(Task, abc.ABC):
  """A task over labelled examples. Subclasses with has_labels also define
  label_values(example) -> the label strings it carries (one per text, or one per word)."""

  kind = ""  # the jaxft.data.labeled kind: "classification" | "ner" | "qa"
  # Keys of a featurised split that go to the device; the rest stay on the host for scoring.
  batch_keys: tuple[str, ...] = ()
  default_seq_len = 128
  # Of batch_keys, those with one value per token (packed along the row with the tokens); the
  # rest have one value per example and go into the row's slots.
  token_batch_keys: tuple[str, ...] = ()
  pools_per_slot = False  # the model pools each packed segment (it takes `slots`)
  per_token_outputs: tuple[str, ...] = ()  # eval_outputs with one value per token

  def __init__(self, config: ml_collections.ConfigDict, labels: list[str] | None = None):
    self.config = config
    if self.has_labels and labels is None:
      labels = self._label_set()
    super().__init__(config, labels)
    if self.has_labels:
      self.label_ids = {name: i for i, name in enumerate(self.labels)}
    self.max_len = int(config.seq_len)
    self._features: dict[str, dict[str, np.ndarray]] = {}
    self.packing = bool(config.data.get("packing", False))
    self.slots = int(config.data.get("pack_slots", 0) or packing.default_slots(self.max_len))
    if self.packing:
      self._check_packing()

  def _check_packing(self):
    # Prefix tuning's keys are seen by every query, so it packs; prompt tuning's virtual
    # tokens join the row's first segment, which only the first example would see.
    if self.config.get("peft", {}).get("method", "none") == "prompt":
      raise ValueError("config.data.packing=True with config.peft.method='prompt': the virtual "
                       "tokens would belong to the first example of each row only; set "
                       "config.data.packing=False (prefix tuning packs)")
    if self.slots < 1:
      raise ValueError(f"config.data.pack_slots={self.slots} must be >= 1 (0 = seq_len // 8)")

  @functools.cached_property
  def tokenizer(self):
    if not self.config.data.tokenizer:
      raise ValueError(f"config.data.tokenizer is empty: {self.name} needs the model's own "
                       "tokenizer; set config.init_from to a Hugging Face model directory "
                       "with tokenizer files, or config.data.tokenizer to one")
    return load_tokenizer(self.config.data.tokenizer)

  @functools.cached_property
  def splits(self):
    splits = labeled.load_splits(self.config.data, self.kind)
    train = train_subset(splits["train"], float(self.config.data.get("train_fraction", 1.0)),
                         int(self.config.data.get("split_seed", 0)))
    return continual.stage_splits({**splits, "train": train}, self.config, self.kind)

  @functools.cached_property
  def augmenter(self) -> augment.Augmenter | None:
    # .get: a workdir's config.json written before config.augment existed has no block.
    return augment.from_config(self.config.get("augment"), self.kind)

  # -- labels ----------------------------------------------------------------------------------

  def _label_set(self) -> list[str]:
    """config.data.labels (comma-separated, in id order), else the sorted training labels."""
    given = self.config.data.get("labels", "")
    if given:
      names = [n.strip() for n in given.split(",") if n.strip()]
      if len(set(names)) != len(names):
        raise ValueError(f"config.data.labels={given!r} repeats a label")
      return names
    return sorted({v for ex in self.splits["train"] for v in self.label_values(ex)})

  def label_id(self, value: str, split: str, index: int) -> int:
    if value not in self.label_ids:
      source = ("config.data.labels" if self.config.data.get("labels", "")
                else "the labels of the training split")
      raise ValueError(f"{split} example {index} has label {value!r}, which is not in the label "
                       f"set {self.labels} ({source}); add it to config.data.labels or fix the "
                       "data")
    return self.label_ids[value]

  # -- features --------------------------------------------------------------------------------

  @abc.abstractmethod
  def featurize(self, examples, split: str, with_labels: bool = True) -> dict[str, np.ndarray]:
    """Examples of one split -> dict of [N, ...] arrays (incl. batch_keys; without labels the
    label arrays are zeros, for jaxft.predict)."""

  # -- prediction (jaxft.predict) --------------------------------------------------------------

  @abc.abstractmethod
  def prediction_inputs(self, records: list[dict]) -> list[dict]:
    """Raw input records ({"text"} or, for QA, {"question", "context"}) -> examples."""

  @abc.abstractmethod
  def predictions(self, examples, features, outputs) -> list[dict]:
    """One JSON-able prediction per example, from eval_outputs over `features`."""

  def prediction_features(self, examples):
    return self.complete(self.featurize(examples, "predict", with_labels=False))

  def prediction_batches(self, features):
    return self.batches(self.rows(features))

  def features(self, split: str) -> dict[str, np.ndarray]:
    if split not in self._features:
      if split not in self.splits:
        raise ValueError(f"unknown split {split!r}; the splits are {list(self.splits)}")
      self._features[split] = self.complete(self.featurize(self.splits[split], split))
      if split == "train":
        self._features[split].update(self.train_columns)
    return self._features[split]

  @functools.cached_property
  def train_columns(self) -> dict[str, np.ndarray]:  # set by add_train_columns
    return {}

  def add_train_columns(self, columns: dict[str, np.ndarray]) -> None:
    """Per-example columns [N, ...] every training batch carries from now on (a distillation
    teacher's cached logits); unpacked rows without augmentation only (they follow rows)."""
    n = len(self.features("train")["inputs"])
    for key, value in columns.items():
      if len(value) != n:
        raise ValueError(f"the training column {key} has {len(value)} rows for {n} examples")
    if self.packing or self.augmenter:
      raise ValueError("cached per-example training columns need unpacked, unaugmented rows: "
                       "set config.data.packing=False and config.augment.method='none'")
    self.train_columns.update(columns)
    self._features.pop("train", None)

  def complete(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds what every featurised split has: example_mask (1 = real row) and positions."""
    f["example_mask"] = np.ones((len(f["inputs"]),), np.float32)
    f["positions"] = np.broadcast_to(np.arange(self.max_len, dtype=np.int32),
                                     f["inputs"].shape).copy()
    return f

  def device_arrays(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("inputs", "segment_ids", "token_types", "positions", "example_mask", *self.batch_keys)
    return {**{k: f[k] for k in keys}, **{k: f[k] for k in self.train_columns if k in f}}

  @property
  def _token_keys(self) -> tuple[str, ...]:
    """Features packed along the row (the rest of batch_keys go into slots)."""
    return ("inputs", "token_types", *self.token_batch_keys)

  @property
  def _example_keys(self) -> tuple[str, ...]:
    return tuple(k for k in self.batch_keys if k not in self.token_batch_keys)

  def rows(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A featurised split as the rows the model sees, in order: one example per row, or packed
    (bins of eval_batch_size rows filled at once)."""
    if not self.packing:
      return self.device_arrays(f)
    return packing.pack_in_order(f, self.max_len, self.slots, self._token_keys,
                                 self._example_keys, bins=self._eval_batch_size())

  def hf_inputs(self, batch: dict) -> dict:
    if self.packing:  # a transformers model would read a packed row as one text
      raise ValueError("jaxft.bench --torch feeds the transformers model unpacked rows: set "
                       "config.data.packing=False for the side-by-side step")
    return super().hf_inputs(batch)

  def num_train_examples(self) -> int:
    """Rows of one epoch: examples, or the rows they pack into (the epoch's steps follow)."""
    if self.packing:
      return self._packed_train_rows
    copies = self.augmenter.copies if self.augmenter else 1
    return copies * len(self.features("train")["inputs"])

  @functools.cached_property
  def _packed_train_rows(self) -> int:
    """Rows of the first epoch as training packs it (its shuffle, batch_size bins at once)."""
    seed = int(self.config.data.get("shuffle_seed", 0))
    if self.augmenter:
      ds = self._augmented_examples(seed, repeat=False)
    else:
      examples = packing.ExampleRows(self.features("train"), self._token_keys,
                                     self._example_keys)
      ds = grain.MapDataset.source(examples).shuffle(seed=seed).to_iter_dataset()
    return sum(1 for _ in packing.pack(ds, self.max_len, self.slots, self._token_keys,
                                       self._example_keys, bins=self.config.batch_size,
                                       seed=seed))

  def report_split(self) -> str:
    return "test"

  def train_iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable: a seeded shuffle of the training rows, new every epoch."""
    keep = pipeline.process_rows(self.config.batch_size, process_index, process_count)
    size = self.config.batch_size
    if self.augmenter and not self.packing:
      ds = self._augmented_raw(seed).batch(size, drop_remainder=True, batch_fn=list)
      ds = ds.map(self._augmented_batch).to_iter_dataset(_AUGMENT_READ)
    elif self.augmenter:  # augmented examples, then packed as below
      ds = packing.pack(self._augmented_examples(seed), self.max_len, self.slots,
                        self._token_keys, self._example_keys, bins=size, seed=seed
                        ).batch(size, drop_remainder=True)
    elif not self.packing:
      padding = float(np.mean(self.features("train")["segment_ids"] == 0))
      if padding > 0.5 and process_index == 0:
        log.warning("%.0f%% of the training rows' tokens are padding (config.seq_len=%d): "
                    "--config.data.packing=true packs several examples a row, so steps pay "
                    "for real tokens only (docs/fine-tuning.md)", 100 * padding, self.max_len)
      ds = (grain.MapDataset.source(ArrayRows(self.device_arrays(self.features("train"))))
            .shuffle(seed=seed).repeat(None).batch(size, drop_remainder=True).to_iter_dataset())
    else:  # a batch's worth of rows filled at once, from the epoch's shuffled examples
      examples = packing.ExampleRows(self.features("train"), self._token_keys,
                                     self._example_keys)
      ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None).to_iter_dataset()
      ds = packing.pack(ds, self.max_len, self.slots, self._token_keys, self._example_keys,
                        bins=size, seed=seed).batch(size, drop_remainder=True)
    return iter(ds.map(functools.partial(_rows_of_process, keep=keep)))

  def _augmented_raw(self, seed: int, repeat: bool = True) -> grain.MapDataset:
    """(index, augmented example) in the epoch's shuffled order: an epoch holds each training
    example `copies` times, augmented per (seed, epoch, index, copy)."""
    source, aug = self.splits["train"], self.augmenter
    n = len(source)
    size = n * aug.copies

    def one(i, j):
      index = j % n
      return index, aug(source[index], seed, i // size, index, j // n)

    ds = grain.MapDataset.range(size).shuffle(seed=seed)
    return (ds.repeat(None) if repeat else ds).map_with_index(one)

  def _augmented_batch(self, items) -> dict[str, np.ndarray]:
    """A list of (index, example) -> featurised rows, one per example."""
    return self.device_arrays(self.complete(self.featurize([e for _, e in items], "train")))

  def _augmented_examples(self, seed: int, repeat: bool = True) -> grain.IterDataset:
    """Augmented examples as packing.ExampleRows gives them (example_index: the original's)."""
    size = self.config.batch_size

    def rows(items):
      f = self._augmented_batch(items)
      examples = packing.ExampleRows(f, self._token_keys, self._example_keys)
      out = [examples[k] for k in range(len(items))]
      for row, (index, _) in zip(out, items):
        row["example_index"] = np.asarray([index], np.int32)
      return out

    ds = self._augmented_raw(seed, repeat).batch(size, batch_fn=list).map(rows)
    return grain_experimental.FlatMapIterDataset(ds.to_iter_dataset(_AUGMENT_READ),
                                                 _Unbatch(size))

  def eval_batches(self, split: str = "validation", process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The split in order, in batches of config.eval_batch_size (or batch_size) rows."""
    return self.batches(self.rows(self.features(split)), process_index, process_count)

  def _eval_batch_size(self) -> int:
    return int(self.config.get("eval_batch_size", 0) or self.config.batch_size)

  def batches(self, arrays: dict[str, np.ndarray], process_index: int = 0,
              process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed-shape batches in order; the last is padded with rows whose example_mask is 0."""
    size = self._eval_batch_size()
    keep = pipeline.process_rows(size, process_index, process_count)
    n = len(arrays["inputs"])
    out = []
    for start in range(0, n, size):
      batch = {k: v[start:start + size] for k, v in arrays.items()}
      short = size - len(batch["inputs"])
      if short:  # padding rows: example_mask 0, no real tokens
        batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
      out.append(_rows_of_process(batch, keep))
    return out

  # -- evaluation helpers ----------------------------------------------------------------------

  def logits(self, variables, batch, rng=None, deterministic=True):
    packed = {"slots": self.slots} if self.packing and self.pools_per_slot else {}
    return self.apply(variables, batch["inputs"], batch["segment_ids"], batch["token_types"],
                      batch["positions"], rng=rng, deterministic=deterministic, **packed)

  def finish(self, workdir, variables, val, eval_batches) -> None:
    print(f"validation (best checkpoint): {', '.join(f'{k} {v:.4f}' for k, v in val.items())}")

  def packed_outputs(self, batch) -> dict:
    """What eval_outputs adds for packed rows so `gather` can put each example back: which
    example each slot holds, and the tokens' segment ids (for per-token outputs)."""
    if not self.packing:
      return {}
    return {"example_index": batch["example_index"], "example_mask": batch["example_mask"],
            "segment_ids": batch["segment_ids"]}

  def gather(self, outputs, key: str, n: int, per_token: bool | None = None) -> np.ndarray:
    """Output `key` of the split's n examples, in order: the first n rows over all batches,
    or, packed, each real slot's value (per-example outputs, [R, slots, ...]) or its segment's
    tokens (per-token outputs, [R, seq_len, ...], put at the example's unpacked positions 0..)
    put back at its example. `per_token` defaults to whether `key` is in per_token_outputs."""
    values = np.concatenate([o[key] for o in outputs])
    if not self.packing:
      return values[:n]
    index = np.concatenate([o["example_index"] for o in outputs])
    real = np.concatenate([o["example_mask"] for o in outputs]) > 0
    if not np.array_equal(np.bincount(index[real], minlength=n), np.ones(n, int)):
      raise RuntimeError(f"packed outputs do not hold each of the {n} examples exactly once")
    if not (key in self.per_token_outputs if per_token is None else per_token):
      out = np.zeros((n, *values.shape[2:]), values.dtype)
      out[index[real]] = values[real]
      return out
    segments = np.concatenate([o["segment_ids"] for o in outputs])
    out = np.zeros((n, *values.shape[1:]), values.dtype)
    for row, slot in zip(*np.nonzero(real)):
      tokens = values[row][segments[row] == slot + 1]  # contiguous, in order
      out[index[row, slot], :len(tokens)] = tokens
    return out

  @staticmethod
  def mean_loss(outputs) -> float:
    total = sum(float(o["loss_sum"]) for o in outputs)
    weight = sum(float(o["weight"]) for o in outputs)
    return total / max(weight, 1.0)
