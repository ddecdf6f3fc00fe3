"""The data layer: tokenizer, TFDS builder over local files, packing contract, resume, errors."""

import gzip
import json
import lzma
import shutil

import grain
import numpy as np
import pytest

from configs import gpt2 as gpt2_configs
from jaxft.data import pipeline, text_builder
from jaxft.data.tokenizer import load_tokenizer
from tests.helpers import write_corpus


def _data_cfg(tmp_path, **overrides):
  cfg = gpt2_configs.get_config("tiny").data
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.update(overrides)
  return cfg


def test_gpt2_bpe_matches_published_ids_and_round_trips():
  tok = load_tokenizer()
  assert tok.vocab_size == 50257 and tok.eos_id == 50256
  assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids, as in its model card
  text = "  O Romeo, Romeo! wherefore art thou Romeo?\n\n\tCafé — 東京 🙂 <|endoftext|>"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|endoftext|>") == [50256]


def test_chunks_cut_at_line_ends_and_concatenate_back():
  text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(200)) + "x" * 75
  chunks = text_builder.chunk_text(text, 60)
  assert "".join(chunks) == text
  assert all(len(c) <= 60 for c in chunks)
  assert all(c.endswith("\n") for c in chunks[:-2])  # only the over-long last line is cut


def test_txt_and_jsonl_sources_with_fixed_held_out_split(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text("alpha one\nalpha two\n")
  with gzip.open(tmp_path / "c" / "b.jsonl.gz", "wt") as f:
    for i in range(30):
      f.write(json.dumps({"body": f"record {i}\n", "id": i}) + "\n")
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*"), text_field="body",
                  validation_fraction=0.1)
  src = text_builder.data_sources(cfg)
  train = [r["text"].decode() for r in src["train"]]
  val = [r["text"].decode() for r in src["validation"]]
  assert len(val) == 4 and len(train) == 27  # ceil(0.1 * 31) held out
  assert sorted(train + val) == sorted(["alpha one\nalpha two\n"]
                                       + [f"record {i}\n" for i in range(30)])
  # A rebuild elsewhere holds out the same documents.
  again = text_builder.data_sources(_data_cfg(tmp_path / "x", files=cfg.files,
                                              text_field="body", validation_fraction=0.1))
  assert [r["text"].decode() for r in again["validation"]] == val
  # So does the same corpus copied to another directory (another host's mount, another tmp dir).
  shutil.copytree(tmp_path / "c", tmp_path / "moved" / "deeper")
  moved = text_builder.data_sources(_data_cfg(
      tmp_path / "y", files=str(tmp_path / "moved" / "deeper" / "*"), text_field="body",
      validation_fraction=0.1))
  assert [r["text"].decode() for r in moved["validation"]] == val


def test_editing_a_file_rebuilds(tmp_path):
  write_corpus(str(tmp_path / "c"), n_docs=3)
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"),
                  validation_files=str(tmp_path / "c" / "doc000.txt"))
  before = text_builder.data_sources(cfg)["validation"][0]["text"]
  (tmp_path / "c" / "doc000.txt").write_text("A new validation text.\n")
  assert text_builder.data_sources(cfg)["validation"][0]["text"] == b"A new validation text.\n"
  assert before != b"A new validation text.\n"


def test_embedded_corpus_has_its_fixed_validation_plays(tmp_path):
  src = text_builder.data_sources(_data_cfg(tmp_path, files="", chunk_chars=10**9))
  assert len(src["train"]) == 40 and len(src["validation"]) == 2
  titles = [r["text"].decode().lstrip()[:14] for r in src["validation"]]
  assert any("JULIUS CAESAR" in t.upper() for t in titles), titles
  with lzma.open(text_builder.EMBEDDED_TRAIN, "rt") as f:
    assert "romeo_and_juliet" in {json.loads(line)["title"] for line in f}


def _stream_rows(cfg, n_rows, seq_len, seed=0):
  it = pipeline.train_iterator(cfg, seq_len=seq_len, global_batch_size=1, seed=seed)
  return [next(it) for _ in range(n_rows)]


def test_packing_follows_the_batch_contract_and_uses_every_token(tmp_path):
  write_corpus(str(tmp_path / "c"), n_docs=6, words_per_doc=60)
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"), chunk_chars=150,
                  validation_fraction=0.2)
  seq_len = 16
  rows = _stream_rows(cfg, 60, seq_len)
  for b in rows:
    assert set(b) == {"inputs", "targets", "loss_mask", "positions", "segment_ids"}
    seg, pos, mask = b["segment_ids"][0], b["positions"][0], b["loss_mask"][0]
    np.testing.assert_array_equal(b["inputs"][0, 1:], b["targets"][0, :-1])  # shifted labels
    assert seg.min() >= 1  # training rows are never padded
    new = np.r_[True, seg[1:] != seg[:-1]]
    np.testing.assert_array_equal(pos[new], 0)
    np.testing.assert_array_equal(pos[~new], pos[np.flatnonzero(~new) - 1] + 1)
    np.testing.assert_array_equal(mask[:-1], (seg[1:] == seg[:-1]).astype(np.float32))

  # Rows are consecutive windows of seq_len + 1 tokens of one stream, overlapping by one token:
  # the chunks, in grain's seeded shuffle order, each EOS-prefixed when it starts a document.
  tok = load_tokenizer()
  source = text_builder.data_sources(cfg)["train"]
  order = grain.MapDataset.source(source).shuffle(seed=0).repeat(None)
  stream = []
  for i in range(len(source) * 3):
    r = order[i]
    stream += ([tok.eos_id] if r["is_doc_start"] else []) + tok.encode(r["text"].decode())
  for a, b in zip(rows, rows[1:]):
    assert a["targets"][0, -1] == b["inputs"][0, 0]
  packed = np.concatenate([rows[0]["inputs"][0, :1]] + [b["targets"][0] for b in rows])
  np.testing.assert_array_equal(packed, stream[:len(packed)])
  assert len(packed) > sum(len(tok.encode(r["text"].decode())) for r in source)  # > 1 epoch


def test_epochs_are_reshuffled_and_seed_changes_order(tmp_path):
  write_corpus(str(tmp_path / "c"), n_docs=8, words_per_doc=40)
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"))
  source = text_builder.data_sources(cfg)["train"]
  order = grain.MapDataset.source(source).shuffle(seed=0).repeat(None)
  n = len(source)
  first = [order[i]["text"] for i in range(n)]
  second = [order[n + i]["text"] for i in range(n)]
  assert sorted(first) == sorted(second) and first != second
  a = _stream_rows(cfg, 3, 16, seed=0)
  b = _stream_rows(cfg, 3, 16, seed=1)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_iterator_state_resumes_exactly_and_processes_split_the_global_batch(tmp_path):
  write_corpus(str(tmp_path / "c"), n_docs=6, words_per_doc=200)
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"), chunk_chars=300)
  kw = dict(seq_len=24, global_batch_size=4, seed=0)
  it = pipeline.train_iterator(cfg, **kw)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  want = [next(it) for _ in range(5)]
  resumed = pipeline.train_iterator(cfg, **kw)
  resumed.set_state(state)
  for a, b in zip(want, [next(resumed) for _ in range(5)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])

  halves = [pipeline.train_iterator(cfg, **kw, process_index=p, process_count=2)
            for p in range(2)]
  whole = pipeline.train_iterator(cfg, **kw)
  for _ in range(3):
    full, parts = next(whole), [next(h) for h in halves]
    for k in full:
      np.testing.assert_array_equal(full[k], np.concatenate([p[k] for p in parts]))


def test_eval_batches_are_padded_and_cover_the_split(tmp_path):
  write_corpus(str(tmp_path / "c"), n_docs=10, words_per_doc=100)
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt"), validation_fraction=0.3)
  batches = pipeline.eval_batches(cfg, seq_len=32, global_batch_size=5)
  again = pipeline.eval_batches(cfg, seq_len=32, global_batch_size=5)
  for a, b in zip(batches, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert all(b["inputs"].shape == (5, 32) for b in batches)
  last = batches[-1]
  pad = last["segment_ids"] == 0
  assert pad.any() and (last["loss_mask"][pad] == 0).all()
  # Scored targets: every token of every chunk except the chunk's first.
  tok = load_tokenizer()
  source = text_builder.data_sources(cfg)["validation"]
  n_tokens = sum(len(tok.encode(r["text"].decode())) + int(r["is_doc_start"]) - 1
                 for r in source)
  assert sum(b["loss_mask"].sum() for b in batches) == n_tokens
  assert len(pipeline.eval_batches(cfg, seq_len=32, global_batch_size=5, max_batches=1)) == 1


def test_unigram_baseline_by_hand(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "train.txt").write_text("a a a b\n")
  (tmp_path / "c" / "val.txt").write_text("a b\n")
  cfg = _data_cfg(tmp_path, files=str(tmp_path / "c" / "train.txt"),
                  validation_files=str(tmp_path / "c" / "val.txt"))
  tok = load_tokenizer()
  batches = pipeline.eval_batches(cfg, seq_len=8, global_batch_size=1)
  counts = np.zeros(tok.vocab_size)
  for t in tok.encode("a a a b\n"):
    counts[t] += 1
  p = (counts + 1) / (counts.sum() + tok.vocab_size)
  targets = tok.encode("a b\n")  # after EOS: "a", " b", "\n"
  want = -np.mean(np.log(p[targets]))
  assert pipeline.unigram_cross_entropy(cfg, batches) == pytest.approx(want, rel=1e-9)


def test_user_errors_name_the_field(tmp_path):
  (tmp_path / "c").mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.data\.files=.*matches no files"):
    text_builder.data_sources(_data_cfg(tmp_path, files=str(tmp_path / "c" / "*.txt")))
  (tmp_path / "c" / "notes.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match=r"config\.data\.files: .*notes\.csv is not a supported"):
    text_builder.data_sources(_data_cfg(tmp_path, files=str(tmp_path / "c" / "*.csv")))
  (tmp_path / "c" / "d.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl:2 has no 'text' field.*config\.data\.text_field"
                                       r".*\['content'\]"):
    text_builder.data_sources(_data_cfg(tmp_path, files=str(tmp_path / "c" / "d.jsonl")))
  (tmp_path / "c" / "one.txt").write_text("just one line\n")
  with pytest.raises(ValueError, match=r"single chunk.*validation_files"):
    text_builder.data_sources(_data_cfg(tmp_path, files=str(tmp_path / "c" / "one.txt")))
  (tmp_path / "c" / "blank.txt").write_text("\n\n")
  with pytest.raises(ValueError, match=r"config\.data\.validation_files hold no text"):
    text_builder.data_sources(_data_cfg(tmp_path, files=str(tmp_path / "c" / "one.txt"),
                                        validation_files=str(tmp_path / "c" / "blank.txt")))
