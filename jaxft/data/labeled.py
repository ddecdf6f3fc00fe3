"""Labeled examples for fine-tuning (classification, NER, extractive QA) through a TFDS builder.

Sources: a built-in corpus read from an installed package's files ("bbc_news", "wnut16"; the
packages are located, never imported) or user files named by config.data.train / validation /
test. Every example is stored as one JSON string (a single Text feature), so one builder serves
all three formats; `load_splits` returns random-access sequences that decode it back to a dict:

  classification  {"text": str, "label": str}
  ner             {"tokens": list[str], "tags": list[str]}
  qa              {"id", "title", "question", "context": str,
                   "answers": {"text": list[str], "answer_start": list[int]},
                   "is_impossible": bool}
  chat            {"messages": [...]} or {"prompt", "completion"} (jaxft/data/chat_records.py)
  preference      {"prompt", "chosen", "rejected"}

Splits are "train", "validation" and "test". A split given as a file is used as is, in file
order. Missing validation / test splits are carved from train: its units (examples; for QA all
questions sharing a context, so that no context leaks across splits) are shuffled with
random.Random(split_seed) and cut train | validation | test at int((1 - vf - tf) * n) and
int((1 - tf) * n). With the defaults this is exactly the 80/10/10 split of
the transformers reference script jaxft.bench.finetune runs (--peer), so bbc_news has that
script's test set.

As in text_builder, the builder's config name is a fingerprint of the inputs (paths, sizes,
mtimes) and settings: editing a file or an option rebuilds, unchanged inputs load from cache.
"""

import collections.abc
import dataclasses
import hashlib
import json
import os
import random

import tensorflow_datasets as tfds

from jaxft.data import synthetic_instructions, text_builder, textio
from jaxft.data.chat_records import read_chats, read_preferences
from jaxft.data.errors import BadInputError
from jaxft.data.readers import (
  BUILTINS,
  bbc_files,
  read_bbc_news,
  read_classification,
  read_conll,
  read_squad,
  strip_compression,
  wnut_file,
)
from jaxft.data.text_builder import default_data_dir

_FORMAT_VERSION = 3  # bump when the records' content for the same inputs would change
KINDS = ("classification", "ner", "qa", "chat", "preference")
# Examples of the generated built-ins (instructions: SFT; instruction_preferences: DPO).
SYNTHETIC_SIZES = {"instructions": 8000, "instruction_preferences": 4000}
SPLITS = ("train", "validation", "test")
CLASSIFICATION_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to build; resolved and checked from `config.data` by `resolve_spec`."""

  kind: str
  dataset: str  # "" = user files
  train: str  # absolute paths, "" = absent (always "" for a built-in)
  validation: str
  test: str
  text_field: str
  label_field: str
  validation_fraction: float
  test_fraction: float
  split_seed: int
  inputs: tuple[str, ...]  # every file read, for the fingerprint
  encoding: str = "utf-8"  # of the user's files (config.data.encoding); built-ins know theirs
  encoding_errors: str = "strict"

  def fingerprint(self) -> str:
    settings = [_FORMAT_VERSION, self.kind, self.dataset, self.train, self.validation, self.test,
                self.text_field, self.label_field, repr(self.validation_fraction),
                repr(self.test_fraction), self.split_seed, self.encoding, self.encoding_errors,
                synthetic_instructions.VERSION]
    h = hashlib.sha256(json.dumps(settings).encode())
    for f in self.inputs:
      st = os.stat(f)
      h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "c" + h.hexdigest()[:16]

  def given(self, split: str) -> str:
    return getattr(self, split)


def _check_fraction(split: str, fraction: float, builtin: bool):
  field = f"config.data.{split}_fraction"
  alternative = "" if builtin else f" or give a {split} file in config.data.{split}"
  if fraction <= 0:
    raise ValueError(f"{field}={fraction} leaves the {split} split empty; set it in (0, 1)"
                     f"{alternative}")
  if fraction >= 1:
    raise ValueError(f"{field}={fraction} leaves nothing for the train split; set it in (0, 1)"
                     f"{alternative}")


def resolve_spec(data_cfg, kind: str) -> Spec:
  """config.data + kind -> Spec; raises on settings that cannot give three non-empty splits."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
  dataset = data_cfg.get("dataset", "") or ""
  files = {s: data_cfg.get(s, "") or "" for s in SPLITS}
  vf = float(data_cfg.get("validation_fraction", 0.1))
  tf = float(data_cfg.get("test_fraction", 0.1))
  if dataset:
    if dataset not in BUILTINS:
      raise ValueError(f"config.data.dataset={dataset!r} is not a built-in dataset; use one of "
                       f"{', '.join(repr(d) for d in BUILTINS)}, or '' to read the files in "
                       "config.data.train / validation / test")
    builtin_kind = BUILTINS[dataset][0]
    if builtin_kind != kind:
      raise ValueError(f"config.data.dataset={dataset!r} is a {builtin_kind} dataset, but "
                       f"{kind} examples were asked for; pick a {kind} dataset or files")
    if any(files.values()):
      set_fields = ", ".join(f"config.data.{s}" for s, f in files.items() if f)
      raise ValueError(f"config.data.dataset={dataset!r} reads its own files, so {set_fields} "
                       "would be ignored; clear them, or set config.data.dataset='' to use them")
    if dataset == "bbc_news":
      inputs = tuple(f for f, _ in bbc_files())
    elif dataset == "wnut16":
      inputs = (wnut_file(),)
    else:  # generated: the fingerprint's format version covers the generator
      inputs = ()
  else:
    if not files["train"]:
      raise ValueError("config.data.train is empty and config.data.dataset=''; give a training "
                       f"file, or set config.data.dataset to one of {', '.join(BUILTINS)}")
    for split, path in files.items():
      if not path:
        continue
      path = os.path.abspath(os.path.expanduser(path))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.{split}={files[split]!r} is not a file")
      if kind == "classification" and not strip_compression(path).endswith(
          CLASSIFICATION_SUFFIXES):
        raise ValueError(f"config.data.{split}: {path} is not a supported classification file; "
                         "use .csv, .tsv (header row) or .jsonl (one JSON object per line)")
      files[split] = path
    inputs = tuple(f for f in files.values() if f)
  if not files["validation"]:
    _check_fraction("validation", vf, bool(dataset))
  if not files["test"]:
    _check_fraction("test", tf, bool(dataset))
  encoding = textio.Encoding.of(data_cfg)  # checked before any file is read
  if not files["validation"] and not files["test"] and vf + tf >= 1:
    raise ValueError(f"config.data.validation_fraction={vf} + config.data.test_fraction={tf} "
                     ">= 1 leaves nothing for the train split; lower them")
  return Spec(kind=kind, dataset=dataset, train=files["train"], validation=files["validation"],
              test=files["test"], text_field=data_cfg.get("text_field", "text"),
              label_field=data_cfg.get("label_field", "label"), validation_fraction=vf,
              test_fraction=tf, split_seed=int(data_cfg.get("split_seed", 0)), inputs=inputs,
              encoding=encoding.name, encoding_errors=encoding.errors)


def _units(kind: str, examples: list[dict]) -> list[list[dict]]:
  """The groups a split is carved in: single examples, or for QA all questions of a context."""
  if kind != "qa":
    return [[e] for e in examples]
  by_context: dict[str, list[dict]] = {}
  for e in examples:
    by_context.setdefault(e["context"], []).append(e)
  return list(by_context.values())


def _flat(units: list[list[dict]]) -> list[dict]:
  return [e for unit in units for e in unit]


class LabeledExamples(tfds.core.GeneratorBasedBuilder):
  """Labeled examples as JSON strings (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, spec: Spec, **kwargs):
    self._spec = spec
    config = tfds.core.BuilderConfig(
        name=spec.fingerprint(), description=f"{spec.kind}: {spec.dataset or spec.train}")
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Keep records in split order (TFDS would order them by key hash): a carved split is already
    # a seeded shuffle, and a given split keeps the file's order. It must go to DatasetInfo: TFDS
    # 4.9 ignores a `disable_shuffling` class attribute.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"example": tfds.features.Text()}),
        disable_shuffling=True)

  def _read(self, split: str) -> list[dict]:
    s = self._spec
    if s.dataset == "bbc_news":
      return read_bbc_news()
    if s.dataset == "wnut16":
      return read_conll(wnut_file())
    if s.dataset == "instructions":
      return synthetic_instructions.chats(SYNTHETIC_SIZES[s.dataset], seed=0)
    if s.dataset == "instruction_preferences":
      return synthetic_instructions.preferences(SYNTHETIC_SIZES[s.dataset], seed=0)
    path = s.given(split)
    encoding = textio.Encoding(s.encoding, s.encoding_errors)
    if s.kind == "classification":
      examples = read_classification(path, s.text_field, s.label_field, encoding)
    elif s.kind == "ner":
      examples = read_conll(path, encoding)
    elif s.kind == "chat":
      examples = read_chats(path, encoding)
    elif s.kind == "preference":
      examples = read_preferences(path, encoding)
    else:
      examples = read_squad(path, encoding)
    if not examples:
      carve = "" if split == "train" else f", or clear config.data.{split} to carve it from train"
      raise BadInputError(f"config.data.{split}={path} holds no {s.kind} examples (empty file?);"
                          f" give a file with examples{carve}", path)
    return examples

  def _split_generators(self, dl_manager):
    del dl_manager
    s = self._spec
    splits = {split: self._read(split) for split in SPLITS if split == "train" or s.given(split)}
    carve = [split for split in SPLITS if split not in splits]
    if carve:
      units = _units(s.kind, splits["train"])
      random.Random(s.split_seed).shuffle(units)
      vf = s.validation_fraction if "validation" in carve else 0.0
      tf = s.test_fraction if "test" in carve else 0.0
      n = len(units)
      # The reference script's cut points: train = [:int(.8 n)], validation up to int(.9 n).
      train_end, validation_end = int((1 - vf - tf) * n), int((1 - tf) * n)
      carved = {"train": units[:train_end], "validation": units[train_end:validation_end],
                "test": units[validation_end:]}
      unit = "contexts" if s.kind == "qa" else "examples"
      source = f"config.data.dataset={s.dataset!r}" if s.dataset else "config.data.train"
      for split in ("train", *carve):
        if carved[split]:
          continue
        if split == "train":
          fix = " + ".join(f"config.data.{c}_fraction={getattr(s, c + '_fraction')}"
                           for c in carve)
          raise ValueError(f"{fix} leaves the train split empty ({n} {unit} in {source}); "
                           "lower the fractions or give more training data")
        fraction = f"config.data.{split}_fraction={getattr(s, split + '_fraction')}"
        alternative = "" if s.dataset else f", or give a {split} file in config.data.{split}"
        raise ValueError(f"{fraction} leaves the {split} split empty ({n} {unit} in {source} "
                         f"to carve from); raise config.data.{split}_fraction{alternative}")
      splits.update({split: _flat(carved[split]) for split in ("train", *carve)})
    return {split: [(i, {"example": json.dumps(e, ensure_ascii=False)})
                    for i, e in enumerate(examples)]
            for split, examples in splits.items()}

  def _generate_examples(self, examples):
    yield from examples


class DecodedSource(collections.abc.Sequence):
  """A TFDS data source of JSON records, read back as dicts (random access, for grain)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} examples")
    return json.loads(self._source[index % n]["example"])

  def __repr__(self) -> str:
    return f"DecodedSource({self._source!r})"


def load_splits(data_cfg, kind: str) -> dict[str, DecodedSource]:
  """Builds (once, cached by fingerprint) and returns {"train", "validation", "test"} sources of
  `kind` examples ("classification", "ner" or "qa"; the dicts are in the module docstring)."""
  spec = resolve_spec(data_cfg, kind)
  data_dir = data_cfg.get("data_dir", "") or default_data_dir()
  builder = LabeledExamples(spec=spec, data_dir=data_dir)
  text_builder.prepare(builder, data_dir)
  # Read through a builder restored from the prepared directory: unlike LabeledExamples (whose
  # constructor needs a Spec), it pickles, so the sources can go to grain worker processes.
  reader = tfds.builder_from_directory(builder.data_dir)
  return {split: DecodedSource(reader.as_data_source(split=split)) for split in SPLITS}
