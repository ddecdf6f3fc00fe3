"""Instruction tuning (config.task='sft'): assistant-only loss, packing that changes nothing,
truncation counts, bad records, and a tiny end-to-end run answered with jaxft.generate --chat."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import sft as sft_configs
from jaxft import tasks
from jaxft.data import chat_records, packing, synthetic_instructions
from jaxft.data.errors import BadInputError
from tests.helpers import set_fields

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Reverse: abc"},
                  {"role": "assistant", "content": "cba"}]},
    {"messages": [{"role": "user", "content": "Uppercase: xy"},
                  {"role": "assistant", "content": "XY"},
                  {"role": "user", "content": "Repeat twice: ok"},
                  {"role": "assistant", "content": "ok ok"}]},
    {"prompt": "Sort the letters: cab", "completion": " abc"},
    {"messages": [{"role": "user", "content": "Reverse: hello"},
                  {"role": "assistant", "content": "olleh"}]},
]


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
  return synthetic_instructions.write_char_tokenizer(str(tmp_path_factory.mktemp("chars")))


def _config(tmp_path, tokenizer, **fields):
  config = sft_configs.get_config("default")
  config.data.tokenizer = tokenizer
  config.data.data_dir = str(tmp_path / "tfds")
  config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
  return set_fields(config, fields)


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_loss_on_assistant_tokens_only(tmp_path, char_tokenizer):
  task = tasks.make_task(_config(tmp_path, char_tokenizer, seq_len=96))
  f = task.featurize(CHATS, "train")
  tok = task.tokenizer
  learned = [tok.decode(f["targets"][i][f["loss_mask"][i] > 0]) for i in range(len(CHATS))]
  # Each assistant content and the end-of-turn token after it; the plain prompt/completion
  # record learns its completion and EOS.
  assert learned == ["cba<|im_end|>", "XY<|im_end|>ok ok<|im_end|>", " abc<|im_end|>",
                     "olleh<|im_end|>"]
  everything = tasks.make_task(_config(tmp_path, char_tokenizer, seq_len=96,
                                       **{"sft.loss_on": "all"}))
  g = everything.featurize(CHATS, "train")
  assert np.array_equal(g["loss_mask"], (g["segment_ids"] > 0).astype(np.float32))


def test_packed_loss_and_gradients_equal_unpacked(tmp_path, char_tokenizer):
  """The same conversations, several per packed row or one per row: equal loss sum and
  gradients (attention never crosses a conversation; positions restart)."""
  task = tasks.make_task(_config(tmp_path, char_tokenizer, seq_len=96))
  f = task.complete(task.featurize(CHATS, "train"))
  unpacked = task.device_arrays(f)
  packed = packing.pack_in_order(f, 96, 8, task._token_keys, task._example_keys, bins=4)
  assert packed["inputs"].shape[0] < len(CHATS)  # really packed
  variables = nn.unbox(task.init(jax.random.key(0), 96))

  def loss_and_grads(batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    fn = lambda p: task.loss({**variables, "params": p}, batch, None, True)[0]  # noqa: E731
    return jax.value_and_grad(fn)(variables["params"])

  (a, ga), (b, gb) = loss_and_grads(unpacked), loss_and_grads(packed)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_truncation_warns_with_counts(tmp_path, char_tokenizer, caplog):
  task = tasks.make_task(_config(tmp_path, char_tokenizer, seq_len=24))
  with caplog.at_level(logging.WARNING, logger="jaxft"):
    f = task.featurize(CHATS, "train")
  assert f["inputs"].shape == (4, 24)
  assert "of 4 train conversations are longer than config.seq_len + 1 = 25 tokens" in caplog.text


def test_bad_records_name_file_line_and_field(tmp_path):
  path = _write(tmp_path / "chats.jsonl", [CHATS[0], {"messages": [{"role": "robot",
                                                                    "content": "hi"}]}])
  with pytest.raises(BadInputError, match=r"chats.jsonl:2 has messages\[0\].role='robot'"):
    chat_records.read_chats(path)
  path = _write(tmp_path / "nothing.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
  with pytest.raises(BadInputError, match=r"nothing.jsonl:1 has no assistant message"):
    chat_records.read_chats(path)
  path = _write(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "b"}])
  with pytest.raises(BadInputError, match=r"prefs.jsonl:1 has no 'rejected' field"):
    chat_records.read_preferences(path)


def test_sft_run_end_to_end_then_chat(tmp_path, char_tokenizer, capsys):
  """A few steps on user files: before/after answers, validation loss, then generate --chat
  on the workdir (chat template, stop at <|im_end|>)."""
  from jaxft import generate
  from jaxft.inference import generating
  from jaxft.training import train_and_evaluate

  records = synthetic_instructions.chats(120, seed=1)
  config = _config(tmp_path, char_tokenizer, seq_len=64, num_steps=4, batch_size=8,
                   eval_every=2, **{"sft.eval_answers": 4, "sft.max_new_tokens": 6})
  config.data.dataset = ""
  config.data.train = _write(tmp_path / "train.jsonl", records)
  workdir = str(tmp_path / "run")
  val = train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "before training: exact-match accuracy" in out and "(before training 0.000)" in out
  assert np.isfinite(val["loss"])
  answers = json.loads((tmp_path / "run" / "answers.json").read_text())
  assert answers["answers"] == 4 and len(answers["samples"]) == 3
  run = generating.open_generator(workdir)
  tok = run.tokenizer()
  assert tok.eos_ids[:2] == (tok.backend.token_to_id("<|im_end|>"),
                             tok.backend.token_to_id("<|endoftext|>"))
  chats = generate.read_chats(["Reverse: abcde", "Uppercase: xyzuv"], "Be brief.", None)
  answers = generating.chat_answers(run, chats, max_new_tokens=6, temperature=0.0)
  # The same greedy answers as the task's own held-out answering (one code path for both).
  assert answers == run.task.answer(run.variables, [c + [{"role": "assistant", "content": ""}]
                                                    for c in chats], 6)
  assert all("<|im_end|>" not in a for a in answers)  # decoding stopped at the end of turn
