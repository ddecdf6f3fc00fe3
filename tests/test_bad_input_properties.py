"""Property tests of every reader of user files and of the tokenizers: random unicode, control
characters, NUL bytes, very long lines, empty files, mixed line endings and random bytes either
parse (and then give back what was written) or raise jaxft's BadInputError naming the file;
no other exception escapes. Inputs go to files in a module-wide directory (hypothesis examples
cannot use function-scoped fixtures), and the real reader functions read them."""

import codecs
import gzip
import json
import lzma

import pytest
from absl import app
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from configs import common
from jaxft import generate
from jaxft.data import readers, text_builder, textio
from jaxft.data.errors import BadInputError
from jaxft.data.prompts import parse_verbalizer
from jaxft.data.tokenizer import load_tokenizer
from jaxft.inference import prediction

# derandomize: the same examples every run (a CI failure reproduces); no database in the tree.
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any code point, surrogates included: JSON escapes and tokenizer inputs can hold them.
ANY_CHAR = st.characters(exclude_categories=())
TEXT_CHAR = st.characters(codec="utf-8")  # what a decoded file can hold
CONTROL = st.sampled_from(["\x00", "\x01", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028",
                           "\ufeff", "\t", "\r", "\n", "\r\n"])
LINE = st.lists(st.one_of(st.text(TEXT_CHAR, max_size=12), CONTROL), max_size=8).map("".join)
ENDING = st.sampled_from(["\n", "\r\n", "\r"])
ENCODINGS = st.builds(textio.Encoding, st.sampled_from(["utf-8", "latin-1", "cp1252", "utf-16"]),
                      st.sampled_from(textio.ENCODING_ERRORS))


@st.composite
def text_lines(draw, max_repeat: int = 20_000) -> str:
  """Lines of unicode with control characters, mixed line endings, maybe one very long line
  (a random line repeated up to max_repeat times: up to ~1 MB, a decoder piece)."""
  lines = draw(st.lists(LINE, max_size=10))
  if draw(st.booleans()):
    lines.insert(draw(st.integers(0, len(lines))), draw(LINE) * draw(st.integers(1, max_repeat)))
  ends = [draw(ENDING) for _ in lines]
  return "".join(line + end for line, end in zip(lines, ends)) + draw(st.sampled_from(["", "x"]))


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(ANY_CHAR, max_size=10))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["text", "label", "data", "id", "x"]), inner, max_size=4)),
    max_leaves=12)


@st.composite
def jsonl_lines(draw) -> str:
  """JSON lines that are mostly {"text", "label"} objects, with broken ones among them."""
  out = []
  for _ in range(draw(st.integers(0, 6))):
    record = draw(st.one_of(
        st.fixed_dictionaries({"text": st.text(ANY_CHAR, max_size=20),
                               "label": st.one_of(st.text(max_size=3), st.integers())}),
        JSON_VALUES))
    line = json.dumps(record, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 9)) == 0:
      line = line[:draw(st.integers(0, len(line)))]  # cut short: not JSON any more
    out.append(line + draw(ENDING))
  return "".join(out)


@st.composite
def csv_text(draw, sep: str) -> str:
  """A header and rows of random fields, some quoted, some with the wrong number of fields."""
  header = draw(st.sampled_from([["text", "label"], ["label", "text", "x"], ["text"], []]))
  field = st.one_of(st.text(TEXT_CHAR, max_size=10), st.text(TEXT_CHAR, max_size=10).map(
      lambda s: '"' + s.replace('"', '""') + '"'), st.just('"open'))
  rows = [header] + draw(st.lists(st.lists(field, min_size=0, max_size=4), max_size=6))
  return "".join(sep.join(row) + draw(ENDING) for row in rows)


def _squad(draw) -> str:
  qa = st.fixed_dictionaries({"id": st.text(max_size=3), "question": st.text(max_size=8)},
                             optional={"answers": st.lists(st.fixed_dictionaries(
                                 {"text": st.text(max_size=5),
                                  "answer_start": st.one_of(st.integers(), st.text(max_size=3))}),
                                 max_size=2), "is_impossible": JSON_SCALARS})
  # Mostly the right shape, so that the checks deep inside are reached too.
  paragraph = st.fixed_dictionaries({"context": st.one_of(st.text(max_size=20), JSON_SCALARS)},
                                    optional={"qas": st.lists(qa | qa | JSON_VALUES, max_size=2)})
  article = st.fixed_dictionaries({"paragraphs": st.lists(paragraph | paragraph | JSON_VALUES,
                                                          max_size=2)},
                                  optional={"title": st.text(max_size=3) | JSON_SCALARS})
  squad = st.fixed_dictionaries({"data": st.lists(article | article | JSON_VALUES, max_size=2)})
  squad = squad | squad | squad | JSON_VALUES
  return json.dumps(draw(squad))


@st.composite
def contents(draw, structured=None) -> bytes:
  """Bytes of a file: encoded text (maybe structured), random bytes, or nothing."""
  kinds = ["text", "bytes", "empty"] + ["structured"] * 3 * (structured is not None)
  kind = draw(st.sampled_from(kinds))
  if kind == "empty":
    return b""
  if kind == "bytes":
    return draw(st.binary(max_size=600))
  text = draw(text_lines()) if kind == "text" else draw(structured)
  data = text.encode("utf-8", "surrogatepass")  # half-surrogates make invalid UTF-8, as found
  if draw(st.integers(0, 7)) == 0:  # a stray undecodable byte somewhere
    at = draw(st.integers(0, len(data)))
    data = data[:at] + draw(st.sampled_from([b"\xff", b"\xe9", b"\x80", b"\xc3"])) + data[at:]
  return data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("bad_input_properties")


@pytest.fixture(scope="module")
def tokenizers():
  return {"gpt2": load_tokenizer(), "minilm": load_tokenizer(common.minilm_dir())}


def _write(workdir, name: str, data: bytes) -> str:
  path = workdir / name
  if name.endswith(".gz"):
    data = gzip.compress(data)
  elif name.endswith(".xz"):
    data = lzma.compress(data)
  path.write_bytes(data)
  return str(path)


def _parses_or_bad_input(call, path: str, *args):
  """call(path, *args), or None after a BadInputError that names the file."""
  try:
    out = call(path, *args)
  except BadInputError as e:
    assert str(e) and path in str(e), str(e)
    assert e.path == path or e.path is None
    event(f"bad input: {str(e)[len(path):].split('(')[0].strip(' :0123456789')[:40]}")
    return None
  event("parsed")
  return out


def _expected_text(data: bytes, encoding: textio.Encoding) -> str:
  """What a reader should see: the decoded text, universal newlines, no leading BOM."""
  errors = "replace" if encoding.errors == "replace" else "strict"
  text = codecs.getincrementaldecoder(encoding.name)(errors).decode(data, final=True)
  return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


@SETTINGS
@given(data=contents(), encoding=ENCODINGS, raw=st.booleans())
def test_text_reading_round_trips_or_names_the_bad_bytes(workdir, data, encoding, raw):
  name = "doc.txt" if raw else "doc.txt.gz"
  path = _write(workdir, name, data)
  try:
    expected = _expected_text(data, encoding)
  except UnicodeError:  # UnicodeDecodeError, or utf-16 without a byte-order mark
    with pytest.raises(BadInputError, match=rf"^{path}:\d+ has bytes that are not valid "):
      textio.read_text(path, encoding)
    with pytest.raises(BadInputError, match=r"encoding_errors=replace"):
      list(textio.read_lines(path, encoding))
    return
  assert textio.read_text(path, encoding) == expected
  lines = [line for _, line in textio.read_lines(path, encoding)]
  assert "".join(lines) == expected
  assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines[:-1])
  if raw:
    assert list(text_builder.read_documents(path, "text", encoding)) == [(path, expected)]


@SETTINGS
@given(data=contents(jsonl_lines()), suffix=st.sampled_from([".jsonl", ".jsonl.gz",
                                                             ".jsonl.xz"]))
def test_pretraining_jsonl(workdir, data, suffix):
  path = _write(workdir, "corpus" + suffix, data)
  docs = _parses_or_bad_input(lambda p: list(text_builder.read_documents(p, "text")), path)
  if docs is not None:
    lines = [line for line in _expected_text(data, textio.UTF8).split("\n") if line.strip()]
    assert [text for _, text in docs] == [json.loads(line)["text"] for line in lines]


@SETTINGS
@given(data=st.one_of(contents(csv_text(",")), contents(csv_text("\t")),
                      contents(jsonl_lines())),
       suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]), encoding=ENCODINGS)
def test_classification_files(workdir, data, suffix, encoding):
  path = _write(workdir, "examples" + suffix, data)
  examples = _parses_or_bad_input(readers.read_classification, path, "text", "label", encoding)
  for e in examples or []:
    assert isinstance(e["text"], str) and isinstance(e["label"], str) and e["label"]


@SETTINGS
@given(data=contents(st.lists(st.tuples(st.text(TEXT_CHAR, max_size=6), st.sampled_from(
    [" O", "\tB-LOC", "", " x y I-PER"])), max_size=8).map(
        lambda rows: "".join(t + tag + "\n" for t, tag in rows))))
def test_conll_files(workdir, data):
  path = _write(workdir, "tags.conll", data)
  sentences = _parses_or_bad_input(readers.read_conll, path)
  for s in sentences or []:
    assert len(s["tokens"]) == len(s["tags"]) > 0


@SETTINGS
@given(data=contents(st.composite(lambda draw: _squad(draw))()))
def test_squad_files(workdir, data):
  path = _write(workdir, "squad.json", data)
  examples = _parses_or_bad_input(readers.read_squad, path)
  for e in examples or []:
    assert isinstance(e["question"], str) and isinstance(e["context"], str)
    assert len(e["answers"]["text"]) == len(e["answers"]["answer_start"])


@SETTINGS
@given(data=st.one_of(contents(), contents(jsonl_lines())),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_predict_inputs_one_record_per_line(workdir, data, suffix):
  path = _write(workdir, "inputs" + suffix, data)
  records = _parses_or_bad_input(prediction.read_records, path)
  if records is not None:
    lines = _expected_text(data, textio.UTF8).split("\n")
    if lines[-1] == "":
      lines.pop()  # the last line's newline ends it; it does not start another
    assert len(records) == len(lines)
    assert [r is None for r in records] == [not line.strip() for line in lines]


@SETTINGS
@given(data=st.one_of(contents(), contents(st.dictionaries(
    st.sampled_from(["a", "b"]), st.one_of(st.text(max_size=4), JSON_SCALARS)).map(json.dumps))))
def test_prompt_files(workdir, data):
  path = _write(workdir, "prompts.txt", data)
  try:
    prompts = _parses_or_bad_input(lambda p: generate.read_prompts([], p), path)
  except app.UsageError as e:  # the command line's own message: the file holds no prompt
    assert "--prompts_file" in str(e)
    assert not _expected_text(data, textio.FLAGS_UTF8).strip()
    return
  assert prompts is None or all(p.strip() for p in prompts)
  path = _write(workdir, "verbalizer.json", data)
  try:
    _parses_or_bad_input(parse_verbalizer, path, ["a", "b"])
  except BadInputError:
    raise
  except ValueError as e:  # the verbaliser's own checks of a readable file, named as the flag
    assert str(e).startswith("--verbalizer"), str(e)


@SETTINGS
@given(text=st.one_of(st.text(ANY_CHAR, max_size=60), st.text(TEXT_CHAR, max_size=60),
                      text_lines(max_repeat=300)))  # BPE of one 100 KB "word" takes seconds
def test_tokenizers_encode_any_unicode(tokenizers, text):
  half_surrogate = any(0xD800 <= ord(c) < 0xE000 for c in text)
  for name, tok in tokenizers.items():
    if half_surrogate:
      with pytest.raises(BadInputError, match="half of a surrogate pair"):
        tok.encode(text)
      continue
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch([text, text]) == [ids, ids]
    if name == "gpt2":  # byte-level BPE loses nothing
      assert tok.decode(ids) == text
