"""Bad input data through the real readers: every message names the file, the line (or byte) and
the fix (jaxft.data.errors.BadInputError); config.data.encoding / encoding_errors; and predict
writes one output line per input line."""

import gzip
import json
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import common
from configs import gpt2 as gpt2_configs
from jaxft import hf, tasks
from jaxft.data import labeled, readers, text_builder, textio
from jaxft.data.errors import BadInputError
from jaxft.data.tokenizer import load_tokenizer
from jaxft.inference import prediction
from jaxft.run import loader
from tests.helpers import ROOT, TINY_BERT

FIX = ("set config.data.encoding to the file's encoding (e.g. latin-1 or cp1252), or "
       "config.data.encoding_errors=replace to decode such bytes as U+FFFD")


def _text_cfg(tmp_path, **overrides):
  cfg = gpt2_configs.get_config("tiny").data
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.update(overrides)
  return cfg


def _labeled_cfg(tmp_path, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      dataset="", train="", validation="", test="", text_field="text", label_field="label",
      validation_fraction=0.25, test_fraction=0.25, split_seed=0,
      data_dir=str(tmp_path / "tfds"), encoding="utf-8", encoding_errors="strict"))
  cfg.update(overrides)
  return cfg


def _raises(call, *args) -> str:
  with pytest.raises(BadInputError) as e:
    call(*args)
  assert "Traceback" not in str(e.value)
  return str(e.value)


def test_undecodable_byte_in_a_training_txt_names_file_line_byte_and_fix(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text("first document\nstill fine\n")
  bad = tmp_path / "c" / "b.txt"
  bad.write_bytes(b"line one\nline two\ncaf\xe9 au lait\n")
  cfg = _text_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"))
  message = _raises(text_builder.data_sources, cfg)  # the TFDS builder training reads through
  assert message == (f"{bad}:3 has bytes that are not valid utf-8 (invalid continuation byte): "
                     f"0xE9 at byte 4 of the line (byte offset 21 of the file); {FIX}")


def test_undecodable_byte_in_a_compressed_jsonl(tmp_path):
  path = tmp_path / "d.jsonl.gz"
  with gzip.open(path, "wb") as f:
    f.write(b'{"text": "ok"}\r\n{"text": "\xff"}\n')
  message = _raises(list, text_builder.read_documents(str(path), "text"))
  assert message == (f"{path}:2 has bytes that are not valid utf-8 (invalid start byte): 0xFF at "
                     f"byte 11 of the line (byte offset 26 of the decompressed data); {FIX}")
  (tmp_path / "e.jsonl.gz").write_bytes(b"not gzip at all")
  assert _raises(list, text_builder.read_documents(str(tmp_path / "e.jsonl.gz"), "text")) == (
      f"{tmp_path / 'e.jsonl.gz'} is not a complete gzip file (BadGzipFile: Not a gzipped file "
      "(b'no')); recompress it, or give it uncompressed without the .gz suffix")


def test_encoding_errors_replace_warns_with_the_count_and_proceeds(tmp_path, caplog):
  bad = tmp_path / "b.txt"
  bad.write_bytes(b"ok line\nbad \xff\xfe here\nand \x80 here\n")
  (tmp_path / "a.txt").write_text("another document\n")
  cfg = _text_cfg(tmp_path, files=str(bad), validation_files=str(tmp_path / "a.txt"),
                  encoding_errors="replace")
  with caplog.at_level(logging.WARNING, logger="jaxft"):
    src = text_builder.data_sources(cfg)
  texts = [r["text"].decode() for r in src["train"]]
  assert texts == ["ok line\nbad \ufffd\ufffd here\nand \ufffd here\n"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert (f"{bad}: 3 undecodable byte(s) on 2 line(s) were not valid utf-8 and were replaced by "
          "U+FFFD (config.data.encoding_errors=replace)") in warnings


def test_config_encoding_reads_latin1_files(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_bytes("Pâté à la française\r\nnaïve\n".encode("latin-1"))
  (tmp_path / "c" / "v.txt").write_bytes("Ça va\n".encode("latin-1"))
  cfg = _text_cfg(tmp_path, files=str(tmp_path / "c" / "a.txt"),
                  validation_files=str(tmp_path / "c" / "v.txt"), encoding="latin-1")
  src = text_builder.data_sources(cfg)
  assert [r["text"].decode() for r in src["train"]] == ["Pâté à la française\nnaïve\n"]
  assert [r["text"].decode() for r in src["validation"]] == ["Ça va\n"]
  # Labeled data too: a latin-1 CSV.
  rows = "".join(f"caf\xe9 {i},{'ab'[i % 2]}\n" for i in range(8))
  (tmp_path / "t.csv").write_bytes(("text,label\n" + rows).encode("latin-1"))
  splits = labeled.load_splits(_labeled_cfg(tmp_path, train=str(tmp_path / "t.csv"),
                                            encoding="latin-1"), "classification")
  texts = [s[i]["text"] for s in splits.values() for i in range(len(s))]
  assert sorted(texts) == [f"café {i}" for i in range(8)]
  with pytest.raises(ValueError, match=r"config\.data\.encoding='klingon' is not a text encoding"):
    text_builder.data_sources(_text_cfg(tmp_path, files=cfg.files, encoding="klingon"))


def test_csv_rows_with_more_or_fewer_columns_than_the_header(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("text,label\nfine text,a\nhello, world,b\n")
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:3 has 3 columns, but the header has 2 (['text', 'label']); quote a field that "
      'holds commas ("like, this") or remove the extra values')
  path.write_text("text,label,source\nfine,a,web\nshort,b\n")
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:3 has 2 columns, but the header has 3 (['text', 'label', 'source']); give every "
      "row the header's 3 columns, comma-separated")
  path.write_text('text,label\n"an open quote,a\nnext,b\n')
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:2 has 1 column, but the header has 2 (['text', 'label']) (the row runs over "
      "lines 2-3: a quote left open?); give every row the header's 2 columns, comma-separated")
  path.write_text("\ntext,label,text\na,b,c\n")
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:2 is a header that names the column 'text' (config.data.text_field) 2 times; give "
      "every column its own name")
  tsv = tmp_path / "t.tsv"
  tsv.write_text("text\tlabel\nx\ty\nx\ty\tz\n")
  assert _raises(readers.read_classification, str(tsv), "text", "label") == (
      f"{tsv}:3 has 3 columns, but the header has 2 (['text', 'label']); a .tsv field cannot "
      "hold a tab: remove the extra tabs")
  # Through the loader the error is the same (its messages name the split's file).
  path.write_text("text,label\nfine text,a\nhello, world,b\n")
  with pytest.raises(BadInputError, match=rf"^{path}:3 has 3 columns"):
    labeled.load_splits(_labeled_cfg(tmp_path, train=str(path)), "classification")


def test_bad_jsonl_lines(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n')
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:3 is not valid JSON (Expecting value at column 24); .jsonl files need one JSON "
      "object per line")
  path.write_text('{"text": "a", "label": "x"}\n["b", "y"]\n')
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:2 is a JSON array, not an object; .jsonl files need one JSON object per line")
  path.write_text('{"text": "a", "label": ""}\n')
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:1 has the label '', not a non-empty string or integer "
      "(config.data.label_field='label'); give every example its label")
  path.write_text('{"text": "a\\ud800", "label": "x"}\n')
  assert _raises(readers.read_classification, str(path), "text", "label") == (
      f"{path}:1 holds the escape \\ud800, half of a surrogate pair with no other half: no "
      "character; remove it or complete the pair")
  pretraining = tmp_path / "p.jsonl"
  pretraining.write_text('{"text": "a"}\n{"text": 3}\n')
  assert _raises(list, text_builder.read_documents(str(pretraining), "text")) == (
      f"{pretraining}:2 has a field 'text' that is a JSON number, not a string "
      "(config.data.text_field); set config.data.text_field to the field holding the text")


def test_conll_line_without_a_tag(tmp_path):
  path = tmp_path / "t.conll"
  path.write_text("-DOCSTART- O\n\nParis B-LOC\nis O\nlovely\n")
  assert _raises(readers.read_conll, str(path)) == (
      f"{path}:5 has one column ('lovely'); CoNLL lines need a token first and its tag last, "
      "separated by whitespace; add the tag (e.g. O) after the token, or fix the separator")


def test_malformed_squad_files(tmp_path):
  path = tmp_path / "s.json"
  shape = ('SQuAD files hold {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", '
           '"question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}')
  qa = {"id": "q1", "question": "Where?", "answers": [{"text": "Oslo", "answer_start": 0}]}
  path.write_text(json.dumps({"data": [{"paragraphs": [
      {"context": "Oslo is a city", "qas": [qa, {"id": "q2", "answers": []}]}]}]}))
  assert _raises(readers.read_squad, str(path)) == (
      f"{path} is not SQuAD JSON: data[0].paragraphs[0].qas[1] has no 'question'; {shape}")
  path.write_text(json.dumps({"data": [{"paragraphs": [{"context": 7, "qas": [qa]}]}]}))
  assert _raises(readers.read_squad, str(path)) == (
      f"{path} is not SQuAD JSON: data[0].paragraphs[0].context is a JSON number, not a "
      f"string; {shape}")
  path.write_text(json.dumps({"data": [1]}))
  assert _raises(readers.read_squad, str(path)) == (
      f"{path} is not SQuAD JSON: data[0] is a JSON number, not an object; {shape}")
  path.write_text('{"data": [\n  {"title": "t",}\n]}')
  assert _raises(readers.read_squad, str(path)) == (
      f"{path} is not valid JSON (Expecting property name enclosed in double quotes at line 2, "
      f"column 17); {shape}")


def test_the_tokenizers_refuse_half_surrogates_with_a_message():
  for tok in (load_tokenizer(), load_tokenizer(common.minilm_dir())):
    with pytest.raises(BadInputError, match=r"text 2 of the batch to tokenize holds U\+DC00 at "
                                            r"character 2, half of a surrogate pair"):
      tok.encode_batch(["fine", "a\udc00"])
    assert tok.encode("NUL \x00 and \r\n mixed\rline ends") != []


def _tiny_classifier(path) -> str:
  """A random-init BertForSequenceClassification directory (labels a, b) with all-MiniLM-L6-v2's
  tokenizer, written by jaxft itself: no training and no PyTorch needed to predict with it."""
  path.mkdir()
  (path / "config.json").write_text(json.dumps({
      "architectures": ["BertForSequenceClassification"], "model_type": "bert",
      "vocab_size": 30522, **TINY_BERT}))
  labels = ["a", "b"]
  task = tasks.make_task(loader.hf_run_config(str(path), seq_len=32), labels=labels)
  # Random weights of the right shapes: tracing init is quick, running it op by op is not.
  shapes = nn.unbox(jax.eval_shape(lambda key: task.init(key, 32), jax.random.key(0))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)
  hf.save_hf(str(path), params, task.model_cfg, load_tokenizer(common.minilm_dir()),
             task.architecture, labels)
  return str(path)


def test_predict_writes_one_line_per_input_line(tmp_path):
  model = _tiny_classifier(tmp_path / "hf")
  run = loader.open_run(model, seq_len=32)
  lines = ["first text", "", "   ", "second text", "", "third"]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  n = prediction.predict_file(run, str(tmp_path / "in.txt"), str(tmp_path / "out.jsonl"), 4)
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert n == len(out) == len(lines)
  for line, row in zip(lines, out):
    if line.strip():
      assert row["text"] == line and row["label"] in ("a", "b")
      assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
    else:
      assert row == {"text": "", "label": None, "probabilities": None}
  # A .jsonl input: the same, and a bad line is named by its line number.
  (tmp_path / "in.jsonl").write_text('{"text": "x"}\n\n{"txt": "y"}\n')
  with pytest.raises(BadInputError, match=r"^.*in\.jsonl:3 lacks the string field\(s\) \['text'\]"
                                          r" that a classification model reads \(its fields are "
                                          r"\['txt'\]\); give \.jsonl objects with text$"):
    prediction.predict_file(run, str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"))
  # The CLI prints bad input as one message, no traceback; its flags name the fix.
  (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
  r = subprocess.run([sys.executable, "-m", "jaxft.predict", "--init_from", model, "--input",
                      str(tmp_path / "bad.txt"), "--output", str(tmp_path / "o.jsonl"),
                      "--max_len", "32"], cwd=ROOT, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"jaxft.predict: {tmp_path / 'bad.txt'}:2 has bytes that are not valid utf-8 (invalid "
      "continuation byte): 0xE9 at byte 4 of the line (byte offset 8 of the file); set "
      "--encoding to the file's encoding (e.g. latin-1 or cp1252), or --encoding_errors=replace "
      "to decode such bytes as U+FFFD")
  assert textio.read_text(str(tmp_path / "bad.txt"), textio.Encoding("cp1252")) == "fine\ncafé\n"


@pytest.mark.parametrize("command", [["export", "--out", "unused"], ["generate", "--prompt", "hi"]])
def test_a_missing_run_directory_is_one_line_naming_it(tmp_path, command):
  missing = str(tmp_path / "no_such_run")
  r = subprocess.run([sys.executable, "-m", f"jaxft.{command[0]}", "--workdir", missing,
                      *command[1:]], cwd=tmp_path, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"jaxft.{command[0]}: {missing} is not a directory; give a jaxft training directory or a "
      "Hugging Face model directory")
