"""A TFDS builder over local text files: .txt (one document per file) and .jsonl[.gz|.xz]
(one document per line, its text in `text_field`).

Documents are cut at line boundaries into chunks of at most `chunk_chars` characters, so that a
shuffle mixes text from everywhere even when the corpus is a few long files; `is_doc_start`
marks the first chunk of each document (the pipeline puts EOS only there). Splits: "train" and
"validation", either from validation files or a fixed, content-independent held-out fraction of
the chunks. Records are written as array_record (random access through `tfds.data_source`, no
TensorFlow). The builder's config name is a fingerprint of the inputs and settings, so editing a
file or an option rebuilds, and an unchanged corpus is read from the cache.
"""

import dataclasses
import fcntl
import glob
import hashlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxft.data import textio
from jaxft.data.errors import bad_input

# TFDS warns on every load that a builder config is not one of BUILDER_CONFIGS; ours never are.
logging.getLogger("absl").addFilter(
    lambda record: "Using custom data configuration" not in record.getMessage())

_FORMAT_VERSION = 4  # bump when the records' content for the same inputs would change
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
EMBEDDED_TRAIN = os.path.join(EMBEDDED, "shakespeare_train.jsonl.xz")
EMBEDDED_VALIDATION = os.path.join(EMBEDDED, "shakespeare_validation.jsonl.xz")


@dataclasses.dataclass(frozen=True)
class Sources:
  """What to build from; resolved from `config.data` by `resolve_sources`."""

  train: tuple[str, ...]
  validation: tuple[str, ...]  # empty: hold out validation_fraction of the training chunks
  text_field: str
  validation_fraction: float
  chunk_chars: int
  encoding: str = "utf-8"  # config.data.encoding
  encoding_errors: str = "strict"  # config.data.encoding_errors

  def decoding(self) -> textio.Encoding:
    return textio.Encoding(self.encoding, self.encoding_errors)

  def fingerprint(self) -> str:
    h = hashlib.sha256(str(_FORMAT_VERSION).encode())
    for f in (*self.train, "|", *self.validation):
      h.update(f.encode())
      if f != "|":
        st = os.stat(f)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{self.text_field}:{self.validation_fraction}:{self.chunk_chars}:"
             f"{self.encoding}:{self.encoding_errors}".encode())
    return "c" + h.hexdigest()[:16]


def _expand(globs: str, field: str) -> tuple[str, ...]:
  files = []
  for pattern in (g.strip() for g in globs.split(",")):
    if not pattern:
      continue
    matched = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(f))
    if not matched:
      raise FileNotFoundError(f"config.data.{field}={pattern!r} matches no files; give a glob "
                              "of .txt or .jsonl files (quote it so the shell does not expand it)")
    files += matched
  for f in files:
    if not f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
      raise ValueError(f"config.data.{field}: {f} is not a supported file; use .txt (one "
                       "document per file) or .jsonl / .jsonl.gz / .jsonl.xz (one JSON object "
                       "per line with a text field, see config.data.text_field)")
  return tuple(os.path.abspath(f) for f in dict.fromkeys(files))


def resolve_sources(data_cfg) -> Sources:
  """config.data -> Sources. files "" means the embedded Shakespeare with its fixed split."""
  if data_cfg.files:
    train = _expand(data_cfg.files, "files")
    validation = _expand(data_cfg.validation_files, "validation_files")
  else:
    train, validation = (EMBEDDED_TRAIN,), (EMBEDDED_VALIDATION,)
    if data_cfg.validation_files:
      validation = _expand(data_cfg.validation_files, "validation_files")
  if not validation and not 0 < data_cfg.validation_fraction < 1:
    raise ValueError(f"config.data.validation_fraction={data_cfg.validation_fraction} must be in "
                     "(0, 1) when config.data.validation_files is empty")
  if data_cfg.chunk_chars < 1:
    raise ValueError(f"config.data.chunk_chars={data_cfg.chunk_chars} must be >= 1")
  encoding = textio.Encoding.of(data_cfg)  # checked here, before any file is read
  return Sources(train, validation, data_cfg.text_field, float(data_cfg.validation_fraction),
                 int(data_cfg.chunk_chars), encoding.name, encoding.errors)


def read_documents(path: str, text_field: str, encoding: textio.Encoding = textio.UTF8):
  """Yields (document id, text) of one file."""
  if path.endswith(TEXT_SUFFIXES):
    yield path, textio.read_text(path, encoding)
    return
  field = "config.data.text_field"
  for n, line in textio.read_lines(path, encoding):
    if not line.strip():
      continue
    record = textio.json_value(line, path, n, ".jsonl files need one JSON object per line")
    if not isinstance(record, dict):
      raise bad_input(path, n, f"is a JSON {textio.json_type(record)}, not an object",
                      f".jsonl files need one JSON object per line, its text in {field}")
    if text_field not in record:
      raise bad_input(path, n, f"has no {text_field!r} field ({field}={text_field!r}); its "
                      f"fields are {sorted(record)}", f"set {field} to the one holding the text")
    if not isinstance(record[text_field], str):
      raise bad_input(path, n, f"has a field {text_field!r} that is a JSON "
                      f"{textio.json_type(record[text_field])}, not a string ({field})",
                      f"set {field} to the field holding the text")
    yield f"{path}:{n}", record[text_field]


def chunk_text(text: str, chunk_chars: int) -> list[str]:
  """Cuts at line ends into pieces of <= chunk_chars; a longer single line is cut at the limit.

  Concatenating the pieces gives back `text` exactly.
  """
  chunks, current = [], ""
  for line in text.splitlines(keepends=True):
    while len(line) > chunk_chars:
      if current:
        chunks.append(current)
        current = ""
      chunks.append(line[:chunk_chars])
      line = line[chunk_chars:]
    if len(current) + len(line) > chunk_chars:
      chunks.append(current)
      current = ""
    current += line
  if current:
    chunks.append(current)
  return chunks


def _chunks(files, sources: Sources):
  """(key, record) of every non-empty chunk of `files`, in file and document order."""
  for path in files:
    # The embedded corpus is UTF-8 whatever the user's files are in.
    embedded = os.path.dirname(path) == EMBEDDED
    encoding = textio.UTF8 if embedded else sources.decoding()
    for doc_id, text in read_documents(path, sources.text_field, encoding):
      if not text.strip():
        continue
      for i, chunk in enumerate(chunk_text(text, sources.chunk_chars)):
        yield f"{doc_id}#{i}", {"text": chunk, "is_doc_start": i == 0}


def _held_out(keys: list[str], fraction: float, files) -> set[str]:
  """The ceil(fraction * n) keys with the smallest hashes: fixed for a corpus, spread over it.

  A key is hashed relative to the directory that holds all the files, so the same corpus copied
  elsewhere (another host's mount, another temporary directory) holds out the same chunks.
  """
  root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  digest = lambda k: hashlib.sha256(os.path.relpath(os.path.abspath(k), root).encode()).digest()
  n = int(np.ceil(fraction * len(keys)))
  return set(sorted(keys, key=digest)[:n])


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Chunks of local text documents (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, sources: Sources, **kwargs):
    self._sources = sources
    config = tfds.core.BuilderConfig(name=sources.fingerprint(),
                                     description=f"{len(sources.train)} training files")
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps records in file and document order (TFDS would order them by key
    # hash): validation is read in order, and training order is grain's seeded shuffle, not an
    # artefact of the writer. (TFDS 4.9 ignores it as a class attribute.)
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "is_doc_start": tfds.features.Scalar(np.bool_),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    s = self._sources
    train = list(_chunks(s.train, s))
    if not train:
      raise ValueError(f"config.data.files: {len(s.train)} file(s) matched but hold no text "
                       f"(all empty?): {', '.join(s.train[:5])}")
    if s.validation:
      validation = list(_chunks(s.validation, s))
      if not validation:
        raise ValueError("config.data.validation_files hold no text (all empty?): "
                         f"{', '.join(s.validation[:5])}")
    else:
      if len(train) < 2:
        raise ValueError(
            f"config.data.files hold a single chunk of text, too little to hold out "
            f"config.data.validation_fraction={s.validation_fraction} of it: add text, lower "
            "config.data.chunk_chars, or give config.data.validation_files")
      held = _held_out([k for k, _ in train], s.validation_fraction, s.train)
      validation = [kv for kv in train if kv[0] in held]
      train = [kv for kv in train if kv[0] not in held]
    return {"train": train, "validation": validation}

  def _generate_examples(self, examples):
    yield from examples


def default_data_dir() -> str:
  return os.environ.get("JAXFT_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxft", "tfds")


def prepare(builder, data_dir: str) -> None:
  """builder.download_and_prepare() holding a lock file in data_dir: processes that share the
  directory (several per host, or hosts on a shared disk) build a dataset once; the others wait
  for the lock and then find it prepared."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".jaxft-build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def data_sources(data_cfg):
  """Builds (once, cached by fingerprint) and returns {"train": source, "validation": source}.

  Each source is a random-access sequence of {"text": bytes, "is_doc_start": bool}.
  """
  sources = resolve_sources(data_cfg)
  data_dir = data_cfg.data_dir or default_data_dir()
  builder = LocalText(sources=sources, data_dir=data_dir)
  prepare(builder, data_dir)
  return {split: builder.as_data_source(split=split) for split in ("train", "validation")}
