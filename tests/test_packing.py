"""Packed classification (config.data.packing): several examples per row give each example the
outputs it has alone in a row (BERT's [CLS] pooler, GPT-2's last token), in evaluation and
predict; a packed run learns and resumes bit-exactly; unsupported combinations are refused."""

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
from tests.helpers import loss_rows, set_fields, topic_rows, write_csv


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
                                                            family):
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


def test_packing_refuses_what_it_does_not_support(tmp_path, tiny_bert):
  config = _config(tmp_path, tiny_bert, **{"data.packing": True})
  ner = set_fields(finetune.get_config("ner"), {"init_from": tiny_bert, "data.packing": True})
  with pytest.raises(ValueError, match=r"config\.data\.packing=True is not supported by the "
                                       r"token_classification task yet"):
    tasks.make_task(loader.resolve(ner), labels=["O", "B-x"])
  prompt = loader.resolve(set_fields(config, {"peft.method": "prompt"}))
  with pytest.raises(ValueError, match=r"config\.data\.packing=True with config\.peft\.method="
                                       r"'prompt': the virtual tokens would belong to the first "
                                       r"example of each row only"):
    tasks.make_task(prompt, labels=["money", "sport"])
