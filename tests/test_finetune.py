"""Fine-tuning end to end on a tiny random BERT (saved by transformers) with all-MiniLM-L6-v2's
WordPiece tokenizer: classification, NER and QA runs, early stopping, the best checkpoint, the
evaluate / predict / export CLIs, and the errors a user can cause."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from configs import finetune
from jaxft import train
from jaxft.run import checkpoint
from jaxft.run import workdir as workdir_lib
from tests import helpers
from tests.helpers import ROOT, set_fields, topic_rows, write_conll, write_csv, write_squad


def _config(variant, tmp_path, init_from, **overrides):
  config = finetune.get_config(variant)
  config.init_from = init_from
  config.data.data_dir = str(tmp_path / "tfds")
  config.seq_len = 32
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 0
  config.optim.lr = 3e-3
  config.log_every = 5
  return set_fields(config, overrides)


def _cli(module, *args):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_classification_run_best_checkpoint_reports_and_clis(tmp_path, tiny_bert, capsys):
  train_csv = write_csv(tmp_path / "train.csv", topic_rows(160, 0))
  val_csv = write_csv(tmp_path / "val.csv", topic_rows(40, 1))
  config = _config("classification", tmp_path, tiny_bert, **{
      "data.train": train_csv, "data.validation": val_csv, "data.test_fraction": 0.2,
      "num_steps": 40, "eval_every": 10})
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))
  assert val["accuracy"] >= 0.9  # keyword topics: a tiny BERT learns them in 40 steps
  out = capsys.readouterr().out
  assert "=== test ===" in out and "macro avg" in out and "weighted avg" in out

  assert json.loads((workdir / "labels.json").read_text()) == ["money", "sport"]
  report = json.loads((workdir / "report_test.json").read_text())
  assert set(report["per_class"]) == {"money", "sport"}
  assert report["support"] == 32  # 20% of the 160 training rows carved off as test
  # evaluate CLI on the same (best) params reproduces the report
  _cli("jaxft.evaluate", "--workdir", str(workdir), "--split", "test")
  assert json.loads((workdir / "report_test.json").read_text())["accuracy"] == report["accuracy"]

  # export: transformers loads a BertForSequenceClassification with the label names and gives
  # the same logits as jaxft's best params
  _cli("jaxft.export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"))
  exported = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  assert exported.config.id2label == {0: "money", 1: "sport"}
  _, task, params = helpers.open_trained(str(workdir))
  batches = task.eval_batches("validation")
  ours = helpers.eval_outputs(task, params, batches[:1])[0]["logits"]
  b = batches[0]
  with torch.no_grad():
    theirs = exported(input_ids=torch.from_numpy(b["inputs"]).long(),
                      attention_mask=torch.from_numpy(b["segment_ids"]).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

  # predict from the workdir and from the exported directory agree and are readable
  (tmp_path / "in.txt").write_text("striker goal cup match\nbank shares profit market\n")
  for source in (["--workdir", str(workdir)], ["--init_from", str(tmp_path / "hf")]):
    _cli("jaxft.predict", *source, "--input", str(tmp_path / "in.txt"), "--output",
         str(tmp_path / "preds.jsonl"), "--max_len", "32")
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == ["sport", "money"]
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4


def test_early_stopping_keeps_the_best_params(tmp_path, tiny_bert, capsys):
  train_csv = write_csv(tmp_path / "train.csv", topic_rows(80, 0))
  # lr 0 after warmup-free constant: nothing improves, so patience 2 stops after 3 evaluations
  config = _config("classification", tmp_path, tiny_bert, **{
      "data.train": train_csv, "num_steps": 50, "eval_every": 5,
      "early_stopping.patience": 2, "early_stopping.metric": "loss",
      "early_stopping.mode": "min", "optim.lr": 0.0})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  assert "early stop" in capsys.readouterr().out
  assert checkpoint.Checkpointer(str(workdir), 2).latest_step() == 15
  best = [d for d in os.listdir(workdir / "best") if d.isdigit()]
  assert best == ["5"]
  # rerunning the finished, stopped run trains nothing more
  train.train_and_evaluate(config, str(workdir))
  assert checkpoint.Checkpointer(str(workdir), 2).latest_step() == 15


def test_ner_run_scores_entities_and_predicts_spans(tmp_path, tiny_bert):
  config = _config("ner", tmp_path, tiny_bert, **{
      "data.train": write_conll(tmp_path / "train.conll", 120, 0), "num_steps": 40,
      "eval_every": 20})
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))
  assert val["f1"] > 0.9
  report = json.loads((workdir / "report_test.json").read_text())
  assert set(report["per_type"]) == {"LOC", "PER"}
  (tmp_path / "in.txt").write_text("the John Smith in Paris today\n")
  _cli("jaxft.predict", "--workdir", str(workdir), "--input", str(tmp_path / "in.txt"),
       "--output", str(tmp_path / "p.jsonl"))
  pred = json.loads((tmp_path / "p.jsonl").read_text())
  assert pred["entities"] == [{"type": "PER", "start": 4, "end": 14, "text": "John Smith"},
                              {"type": "LOC", "start": 18, "end": 23, "text": "Paris"}]


def test_qa_run_long_contexts_and_answer_spans(tmp_path, tiny_bert):
  # seq_len 32 with doc_stride 8: most contexts need several windows
  config = _config("squad", tmp_path, tiny_bert, **{
      "data.train": write_squad(tmp_path / "train.json", 150, 0), "num_steps": 60,
      "eval_every": 30, "data.doc_stride": 8, "data.max_question_len": 12})
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))
  assert set(val) == {"loss", "exact_match", "f1"}
  assert val["exact_match"] > 50
  context = "the report said the meeting was held in Oslo . of and in"
  (tmp_path / "q.jsonl").write_text(json.dumps(
      {"id": "x", "question": "where was the meeting held ?", "context": context}) + "\n")
  _cli("jaxft.predict", "--workdir", str(workdir), "--input", str(tmp_path / "q.jsonl"),
       "--output", str(tmp_path / "a.jsonl"))
  pred = json.loads((tmp_path / "a.jsonl").read_text())
  assert context[pred["start"]:pred["end"]] == pred["answer"]


def test_errors_a_user_can_cause(tmp_path, tiny_bert):
  train_csv = write_csv(tmp_path / "train.csv", topic_rows(40, 0))
  odd = topic_rows(10, 1)
  odd[3]["label"] = "weather"
  val_csv = write_csv(tmp_path / "val.csv", odd)
  config = _config("classification", tmp_path, tiny_bert, **{
      "data.train": train_csv, "data.validation": val_csv, "num_steps": 2})
  with pytest.raises(ValueError, match=r"validation example 3 has label 'weather'.*"
                                       r"\['money', 'sport'\].*config\.data\.labels"):
    train.train_and_evaluate(config, str(tmp_path / "a"))

  config = _config("classification", tmp_path, tiny_bert, **{
      "data.train": train_csv, "num_steps": 2, "model.vocab_size": 1000})
  config.init_from = ""  # a model whose vocabulary is smaller than the tokenizer's
  config.data.tokenizer = tiny_bert
  with pytest.raises(ValueError, match=r"30522 tokens but config\.model\.vocab_size=1000"):
    train.train_and_evaluate(config, str(tmp_path / "b"))

  config = _config("squad", tmp_path, tiny_bert, **{
      "data.train": write_squad(tmp_path / "bad.json", 20, 0, bad=True), "num_steps": 2})
  with pytest.raises(ValueError, match=r"QA answer not found in its context: example 'q3'"):
    train.train_and_evaluate(config, str(tmp_path / "c"))

  config = _config("classification", tmp_path, tiny_bert, **{
      "data.train": write_csv(tmp_path / "few.csv", topic_rows(4, 0)), "num_steps": 2})
  with pytest.raises(ValueError, match=r"empty.*validation"):
    train.train_and_evaluate(config, str(tmp_path / "d"))


def test_gpt2_classifier_trains_and_exports_to_transformers(tmp_path):
  """configs/finetune.py with a GPT-2 directory: GPT2ForSequenceClassification end to end."""
  from jaxft.data.tokenizer import load_tokenizer

  hf_in = tmp_path / "gpt2"
  torch.manual_seed(0)
  transformers.GPT2Model(transformers.GPT2Config(
      n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(hf_in)
  load_tokenizer().save(str(hf_in))  # GPT-2's BPE, as a HF tokenizer directory
  config = _config("classification", tmp_path, str(hf_in), **{
      "data.train": write_csv(tmp_path / "train.csv", topic_rows(80, 0)), "num_steps": 30,
      "eval_every": 15})
  workdir = tmp_path / "run"
  val = train.train_and_evaluate(config, str(workdir))
  assert workdir_lib.load_config(str(workdir)).model.family == "gpt2"
  assert val["accuracy"] >= 0.75

  _cli("jaxft.export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"))
  exported = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  assert exported.config.id2label == {0: "money", 1: "sport"}
  _, task, params = helpers.open_trained(str(workdir))
  b = task.eval_batches("validation")[0]
  ours = helpers.eval_outputs(task, params, [b])[0]["logits"]
  # right padding with the EOS id, which the exported config names as pad_token_id
  with torch.no_grad():
    theirs = exported(input_ids=torch.from_numpy(b["inputs"]).long(),
                      attention_mask=torch.from_numpy(b["segment_ids"]).long()).logits.numpy()
  real = b["example_mask"] > 0
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
