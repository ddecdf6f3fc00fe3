"""Packing (config.data.packing): several examples per row give each example the outputs it has
alone in a row — classification (BERT's [CLS] pooler, GPT-2's last token), NER tags and QA
start/end logits mapped back per segment — in evaluation and predict; packed training rows hold
each example's own tokens and labels; a packed run learns and resumes bit-exactly; unsupported
combinations are refused."""

import functools
import logging
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from configs import finetune
from jaxft import tasks, train
from jaxft.data.tokenizer import load_tokenizer
from jaxft.run import loader
from tests import helpers
from tests.helpers import loss_rows, set_fields, topic_rows, write_conll, write_csv, write_squad


def _rows(n, seed):
  """Topic rows of 1 to 24 words: packed rows mix short and long examples."""
  rng = np.random.default_rng(seed)
  rows = topic_rows(n, seed)
  for r in rows:
    words = r["text"].split()
    r["text"] = " ".join(words * 2)[: int(rng.integers(1, 24)) * 7].strip() or words[0]
  return rows


def _config(tmp_path, init_from, **overrides):
  config = finetune.get_config("classification")
  config.init_from = init_from
  config.data.train = write_csv(tmp_path / "train.csv", _rows(120, 0))
  config.data.validation = write_csv(tmp_path / "val.csv", _rows(37, 1))
  config.data.test_fraction = 0.1
  config.data.data_dir = str(tmp_path / "tfds")
  config.seq_len, config.batch_size, config.eval_batch_size = 64, 8, 8
  config.num_epochs, config.optim.lr = 0, 3e-3
  return set_fields(config, overrides)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt2")
  torch.manual_seed(0)
  transformers.GPT2Model(transformers.GPT2Config(
      n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(path)
  load_tokenizer().save(str(path))
  return str(path)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_packed_rows_give_each_example_its_unpacked_outputs(tmp_path, tiny_bert, tiny_gpt2,
                                                            family, caplog):
  base = loader.resolve(_config(tmp_path, tiny_bert if family == "bert" else tiny_gpt2))
  plain = tasks.make_task(base)
  packed = tasks.make_task(set_fields(base.copy_and_resolve_references(),
                                      {"data.packing": True}), labels=plain.labels)
  variables = nn.unbox(plain.init(jax.random.key(0), base.seq_len))
  head = "classifier" if family == "bert" else "score"
  kernel = variables["params"][head]["kernel"]  # logits of O(1), not a near-zero random head
  variables["params"][head]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape)

  plain_batches, packed_batches = plain.eval_batches(), packed.eval_batches()
  rows = np.concatenate([b["example_index"] for b in packed_batches])
  real = rows[np.concatenate([b["example_mask"] for b in packed_batches]) > 0]
  assert sorted(real.tolist()) == list(range(37))  # every example in exactly one slot
  assert len(packed_batches) < len(plain_batches) / 2
  step = jax.jit(lambda task, b: task.eval_outputs(variables, b), static_argnums=0)
  ours = [jax.device_get(step(packed, b)) for b in packed_batches]
  reference = [jax.device_get(step(plain, b)) for b in plain_batches]
  np.testing.assert_allclose(packed.gather(ours, "logits", 37),
                             plain.gather(reference, "logits", 37), atol=1e-5, rtol=0)
  assert np.abs(plain.gather(reference, "logits", 37)).max() > 0.5
  assert packed.summarize(ours) == pytest.approx(plain.summarize(reference), abs=1e-6)

  # predict goes through the same packing and maps each line back to its text
  # (an empty text too: GPT-2 reads it as one EOS token, alone in its row or packed)
  examples = packed.prediction_inputs([{"text": r["text"]} for r in _rows(11, 2)]
                                      + [{"text": ""}])

  def predict(task):
    outs = [jax.device_get(step(task, b))
            for b in task.prediction_batches(task.prediction_features(examples))]
    return task.predictions(examples, None, outs)

  got, want = predict(packed), predict(plain)
  assert [p["text"] for p in got] == [e["text"] for e in examples]
  assert [p["label"] for p in got] == [p["label"] for p in want]
  for a, b in zip(got, want):
    assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)

  # Rows mostly padding: training unpacked says so and names the switch (packed: silent).
  with caplog.at_level(logging.WARNING, logger="jaxft"):
    plain.train_iterator(0), packed.train_iterator(0)
  assert caplog.text.count("of the training rows' tokens are padding (config.seq_len=64): "
                           "--config.data.packing=true packs") == 1


def test_a_packed_run_learns_and_resumes_bit_exactly(tmp_path, tiny_bert, caplog):
  config = _config(tmp_path, tiny_bert, **{"data.packing": True, "num_steps": 24,
                                           "eval_every": 12, "checkpoint_every": 12,
                                           "log_every": 4})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  val = train.train_and_evaluate(config, straight)
  # Keyword topics, ~5 examples a row: 24 steps suffice (one example a row: 0.51 here).
  assert val["accuracy"] >= 0.9
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "24"))  # as if killed after step 12
  shutil.copytree(resumed, str(tmp_path / "at_12"))
  with caplog.at_level(logging.INFO, logger="jaxft"):
    train.train_and_evaluate(config, resumed)
  assert f"resumed from step 12 in {resumed}/checkpoints" in caplog.text
  assert loss_rows(resumed) == loss_rows(straight)
  _, task, a = helpers.open_trained(straight, best=False)
  _, _, b = helpers.open_trained(resumed, best=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Resuming the packed run unpacked is refused before anything is read: its saved position
  # belongs to the packed pipeline.
  with pytest.raises(ValueError, match=r"step 12 saved its place in another input pipeline: "
                                       r"config\.data\.packing=False \(the checkpoints' True\)"):
    train.train_and_evaluate(set_fields(config, {"data.packing": False}), str(tmp_path / "at_12"))
  # An epoch is the rows the examples pack into: far fewer than one per example.
  assert task.packing and task.num_train_examples() < 108 / 2  # 108: 120 less the test 10%


def _labeled_config(variant, tmp_path, init_from, **overrides):
  config = finetune.get_config(variant)
  config.init_from = init_from
  config.data.data_dir = str(tmp_path / "tfds")
  if variant == "ner":
    config.data.train = write_conll(tmp_path / "train.conll", 60, 0)
    config.data.validation = write_conll(tmp_path / "val.conll", 41, 1)
  else:  # 128-token rows hold two or three short contexts; stride 24 for longer ones
    config.data.train = write_squad(tmp_path / "train.json", 30, 0)
    config.data.validation = write_squad(tmp_path / "val.json", 41, 1)
    overrides = {"data.doc_stride": 24, "data.max_question_len": 12, "seq_len": 128,
                 **overrides}
  config.data.test_fraction = 0.1
  config.seq_len = 48
  config.batch_size, config.eval_batch_size = 8, 8
  return set_fields(config, overrides)


@pytest.mark.parametrize("variant", ["ner", "squad"])
def test_packed_ner_and_qa_give_each_example_its_unpacked_outputs(tmp_path, tiny_bert, variant):
  base = loader.resolve(_labeled_config(variant, tmp_path, tiny_bert))
  plain = tasks.make_task(base)
  packed = tasks.make_task(set_fields(base.copy_and_resolve_references(),
                                      {"data.packing": True}), labels=plain.labels)
  variables = nn.unbox(plain.init(jax.random.key(0), base.seq_len))
  head = "classifier" if variant == "ner" else "qa_outputs"
  kernel = variables["params"][head]["kernel"]
  variables["params"][head]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape)
  features = plain.features("validation")
  n, real_tokens = len(features["inputs"]), features["segment_ids"] > 0
  packed_batches = packed.eval_batches()
  packed_rows = len(packed.rows(packed.features("validation"))["inputs"])
  assert packed_rows < n * (0.5 if variant == "ner" else 0.75)  # several windows a row

  @functools.partial(jax.jit, static_argnums=0)
  def outputs(task, batch):  # eval_outputs, plus NER's logits (its outputs are argmax ids)
    out = task.eval_outputs(variables, batch)
    return {**out, "logits": task.logits(variables, batch)} if variant == "ner" else out

  ours = [jax.device_get(outputs(packed, b)) for b in packed_batches]
  reference = [jax.device_get(outputs(plain, b)) for b in plain.eval_batches()]
  for key in ("logits",) if variant == "ner" else ("start", "end"):
    want = plain.gather(reference, key, n, per_token=True)
    got = packed.gather(ours, key, n, per_token=True)
    np.testing.assert_allclose(got[real_tokens], want[real_tokens], atol=1e-5, rtol=0)
    assert np.abs(want[real_tokens]).max() > 0.5
  want, got = plain.summarize(reference), packed.summarize(ours)
  if variant == "squad":
    # HF's loss normalises over the padding too; a packed window has none: its loss is each
    # window's start/end cross-entropy over its own tokens, at its own positions.
    def cross_entropy(key, target):
      logits = np.where(real_tokens, plain.gather(reference, key, n, per_token=True), -np.inf)
      top = logits.max(-1)
      logz = top + np.log(np.exp(logits - top[:, None]).sum(-1))
      return logz - logits[np.arange(n), features[target]]

    windows = 0.5 * (cross_entropy("start", "start_positions")
                     + cross_entropy("end", "end_positions"))
    assert got.pop("loss") == pytest.approx(windows.mean(), rel=1e-5)
    want.pop("loss")
  assert got == pytest.approx(want, abs=1e-6)

  # predict packs too and maps each input back
  records = ([{"text": "the John Smith in Paris today"}, {"text": "Paris"}] * 3
             if variant == "ner" else
             [{"id": str(i), "question": "where was the meeting held ?",
               "context": f"{'of the ' * i}the meeting was held in Oslo ."} for i in range(6)])
  examples = packed.prediction_inputs(records)

  def predict(task):
    f = task.prediction_features(examples)
    return task.predictions(examples, f, [jax.device_get(outputs(task, b))
                                          for b in task.prediction_batches(f)])

  got, want = predict(packed), predict(plain)
  if variant == "squad":
    for a, b in zip(got, want):
      assert a["score"] == pytest.approx(b.pop("score"), abs=1e-4)
      a.pop("score")
  assert got == want

  # Training rows: each slot's segment holds its example's own tokens and labels.
  batch = next(packed.train_iterator(0))
  train_features = packed.features("train")
  token_keys = ("inputs", "labels", "label_mask") if variant == "ner" else ("inputs",)
  slot_keys = () if variant == "ner" else ("start_positions", "end_positions")
  checked = 0
  for row, slot in zip(*np.nonzero(batch["example_mask"] > 0)):
    e = batch["example_index"][row, slot]
    segment = batch["segment_ids"][row] == slot + 1
    length = int(segment.sum())
    assert length == int((train_features["segment_ids"][e] > 0).sum())
    np.testing.assert_array_equal(batch["positions"][row][segment], np.arange(length))
    for key in token_keys:
      np.testing.assert_array_equal(batch[key][row][segment], train_features[key][e, :length])
    for key in slot_keys:
      assert batch[key][row, slot] == train_features[key][e]
    checked += 1
  assert checked > len(batch["inputs"])  # several examples a row


def test_packing_refuses_what_it_does_not_support(tmp_path, tiny_bert):
  config = _config(tmp_path, tiny_bert, **{"data.packing": True})
  prompt = loader.resolve(set_fields(config, {"peft.method": "prompt"}))
  with pytest.raises(ValueError, match=r"config\.data\.packing=True with config\.peft\.method="
                                       r"'prompt': the virtual tokens would belong to the first "
                                       r"example of each row only"):
    tasks.make_task(prompt, labels=["money", "sport"])
