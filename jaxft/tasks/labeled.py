"""What the fine-tuning tasks (classification, NER, QA) share: labelled splits from the TFDS
builder (jaxft/data/labeled.py), the label set, featurised splits held as arrays, a grain
training iterator over them and fixed-shape evaluation batches.

A split is featurised once into a dict of [N, ...] arrays (tokenising a few thousand examples
with the Rust tokenizer takes well under a second); grain shuffles its rows every epoch and the
iterator state is checkpointed with the model, as for pretraining. Evaluation batches keep the
split's order and pad the last batch with rows whose example_mask is 0.
"""

import abc
import functools

import grain
import ml_collections
import numpy as np

from jaxft.data import labeled, pipeline
from jaxft.data.tokenizer import load_tokenizer
from jaxft.tasks.base import Task


class ArrayRows:
  """Random-access rows of a dict of equally long arrays (a grain MapDataset source)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self._n = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._arrays.items()}


def _rows_of_process(batch: dict[str, np.ndarray], keep: slice) -> dict[str, np.ndarray]:
  return {k: v[keep] for k, v in batch.items()}


class LabeledTask(Task, abc.ABC):
  """A task over labelled examples. Subclasses with has_labels also define
  label_values(example) -> the label strings it carries (one per text, or one per word)."""

  kind = ""  # the jaxft.data.labeled kind: "classification" | "ner" | "qa"
  # Keys of a featurised split that go to the device; the rest stay on the host for scoring.
  batch_keys: tuple[str, ...] = ()
  default_seq_len = 128

  def __init__(self, config: ml_collections.ConfigDict, labels: list[str] | None = None):
    self.config = config
    if self.has_labels and labels is None:
      labels = self._label_set()
    super().__init__(config, labels)
    if self.has_labels:
      self.label_ids = {name: i for i, name in enumerate(self.labels)}
    self.max_len = int(config.seq_len)
    self._features: dict[str, dict[str, np.ndarray]] = {}

  @functools.cached_property
  def tokenizer(self):
    if not self.config.data.tokenizer:
      raise ValueError(f"config.data.tokenizer is empty: {self.name} needs the model's own "
                       "tokenizer; set config.init_from to a Hugging Face model directory "
                       "with tokenizer files, or config.data.tokenizer to one")
    return load_tokenizer(self.config.data.tokenizer)

  @functools.cached_property
  def splits(self):
    return labeled.load_splits(self.config.data, self.kind)

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
    return self.batches(self.device_arrays(features))

  def features(self, split: str) -> dict[str, np.ndarray]:
    if split not in self._features:
      if split not in self.splits:
        raise ValueError(f"unknown split {split!r}; the splits are {list(self.splits)}")
      self._features[split] = self.complete(self.featurize(self.splits[split], split))
    return self._features[split]

  def complete(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds what every featurised split has: example_mask (1 = real row) and positions."""
    f["example_mask"] = np.ones((len(f["inputs"]),), np.float32)
    f["positions"] = np.broadcast_to(np.arange(self.max_len, dtype=np.int32),
                                     f["inputs"].shape).copy()
    return f

  def device_arrays(self, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("inputs", "segment_ids", "token_types", "positions", "example_mask", *self.batch_keys)
    return {k: f[k] for k in keys}

  def num_train_examples(self) -> int:
    return len(self.features("train")["inputs"])

  def report_split(self) -> str:
    return "test"

  def train_iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable: a seeded shuffle of the training rows, new every epoch."""
    keep = pipeline.process_rows(self.config.batch_size, process_index, process_count)
    ds = (grain.MapDataset.source(ArrayRows(self.device_arrays(self.features("train"))))
          .shuffle(seed=seed)
          .repeat(None)
          .batch(self.config.batch_size, drop_remainder=True)
          .map(functools.partial(_rows_of_process, keep=keep)))
    return iter(ds.to_iter_dataset())

  def eval_batches(self, split: str = "validation", process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The split in order, in batches of config.eval_batch_size (or batch_size) rows."""
    return self.batches(self.device_arrays(self.features(split)), process_index, process_count)

  def batches(self, arrays: dict[str, np.ndarray], process_index: int = 0,
              process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed-shape batches in order; the last is padded with rows whose example_mask is 0."""
    size = int(self.config.get("eval_batch_size", 0) or self.config.batch_size)
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
    return self.apply(variables, batch["inputs"], batch["segment_ids"], batch["token_types"],
                      batch["positions"], rng=rng, deterministic=deterministic)

  def finish(self, workdir, variables, val, eval_batches) -> None:
    print(f"validation (best checkpoint): {', '.join(f'{k} {v:.4f}' for k, v in val.items())}")

  @staticmethod
  def gather(outputs, key: str, n: int) -> np.ndarray:
    """The first n rows (the split's real examples) of output `key` over all batches."""
    return np.concatenate([o[key] for o in outputs])[:n]

  @staticmethod
  def mean_loss(outputs) -> float:
    total = sum(float(o["loss_sum"]) for o in outputs)
    weight = sum(float(o["weight"]) for o in outputs)
    return total / max(weight, 1.0)
