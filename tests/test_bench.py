"""`python -m jaxft.bench`: the figures it prints and its final JSON line."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, topic_rows, write_corpus, write_csv


def test_bench_cli_ends_with_one_json_line_of_consistent_figures(tmp_path):
  corpus = write_corpus(str(tmp_path / "corpus"))
  out = subprocess.run(
      [sys.executable, "-m", "jaxft.bench", "--config", "configs/gpt2.py:tiny", "--steps", "2",
       "--rounds", "2", "--warmup", "1", "--torch", "eager", "--config.mesh.data=1",
       "--config.batch_size=4", f"--config.data.files={corpus}",
       f"--config.data.data_dir={tmp_path / 'tfds'}"],
      cwd=ROOT, capture_output=True, text=True, env=_bench_env())
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  r = json.loads(lines[-1])
  assert r["variant"] == "tiny" and r["batch_size"] == 4 and r["seq_len"] == 32
  assert r["compile_s"] > 0 and len(r["step_s_rounds"]) == 2
  assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"])
  # One CPU device: MFU is against the host's measured f32 matmul ceiling.
  assert r["mfu_vs"] == "measured host CPU f32 matmul ceiling" and r["peak_flops_per_device"] > 1e9
  assert r["mfu"] == pytest.approx(
      r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops_per_device"])
  assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
  # The step fed by the training pipeline (prepared ahead): its time and the idle share.
  assert len(r["input_step_s_rounds"]) == 2 and 0 <= r["input_wait_fraction"] < 1
  assert r["device_idle_fraction"] == pytest.approx(max(0, 1 - r["step_s"] / r["input_step_s"]))
  assert r["temp_bytes"] > 0 and r["host_peak_rss_bytes"] > 0
  assert r["jaxft_over_torch"] == pytest.approx(r["torch_eager_step_s"] / r["step_s"])
  assert any("tokens/s" in line and "MFU" in line for line in lines)
  assert any("waits for input" in line for line in lines)


def _bench_env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env.pop("JAXFT_CPU_PEAK_FLOPS", None)  # MFU against the measured ceiling
  return env


def _tiny_gpt2(path):
  import torch
  import transformers

  from jaxft.data.tokenizer import load_tokenizer

  torch.manual_seed(0)
  transformers.GPT2Model(transformers.GPT2Config(
      n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(path)
  load_tokenizer().save(str(path))  # GPT-2's BPE, as a HF tokenizer directory
  return str(path)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bench_times_a_fine_tuning_head_against_its_transformers_peer(tmp_path, tiny_bert,
                                                                      family):
  """A classification config: the step trains on the task's first training batch (real
  labels), the peer is the task's transformers class (BertForSequenceClassification /
  GPT2ForSequenceClassification, which must find the last real token through the pad id
  jaxft pads with), tokens/s counts non-padding tokens."""
  import transformers

  model_dir = tiny_bert if family == "bert" else _tiny_gpt2(tmp_path / "gpt2")
  train_csv = write_csv(tmp_path / "train.csv", topic_rows(40, 0))
  out = subprocess.run(
      [sys.executable, "-m", "jaxft.bench", "--config", "configs/finetune.py:classification",
       f"--config.init_from={model_dir}", f"--config.data.train={train_csv}",
       f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.seq_len=32",
       "--config.batch_size=8", "--config.num_steps=10", "--config.mesh.data=1",
       "--steps", "2", "--rounds", "2", "--warmup", "1", "--torch", "eager"],
      cwd=ROOT, capture_output=True, text=True, env=_bench_env())
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  # The tiny model's sizes come from init_from, as in training (the config says MiniLM).
  architecture = {"bert": "BertForSequenceClassification",
                  "gpt2": "GPT2ForSequenceClassification"}[family]
  peer = getattr(transformers, architecture).from_pretrained(model_dir, num_labels=2)
  assert r["params"] == sum(p.numel() for p in peer.parameters())
  # 12 words per row: fewer than 32 tokens, so padding is not counted (the product only up to
  # float rounding: it can land a hair under 96 when every word is one token).
  assert 8 * 12 <= r["tokens_per_step"] < 8 * 32
  assert r["tokens_per_s"] * r["step_s"] == pytest.approx(r["tokens_per_step"])
  assert r["jaxft_over_torch"] == pytest.approx(r["torch_eager_step_s"] / r["step_s"])


def test_bench_memory_compares_remat_policies_under_scan():
  """`python -m jaxft.bench.memory`: one --compile_only child per combination; with the layers
  scanned, full remat keeps only each block's input for the backward pass."""
  out = subprocess.run(
      [sys.executable, "-m", "jaxft.bench.memory", "--policies", "none,full", "--scan", "true",
       "--", "--config", "configs/gpt2.py:tiny", "--config.mesh.data=1", "--config.seq_len=256",
       "--config.model.n_positions=256", "--config.model.n_layer=4",
       "--config.model.n_embd=64", "--config.model.n_head=4", "--config.batch_size=16",
       "--config.lm_loss_chunk=8"],
      cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out.stdout.strip().splitlines()[-1])
  assert [(r["remat"], r["scan_layers"]) for r in rows] == [("none", True), ("full", True)]
  none, full = rows
  assert none["train_state"] == full["train_state"] > 0  # the same params and Adam state
  assert full["temp"] < 0.5 * none["temp"]
  assert all(r["compile_s"] > 0 and r["host_peak_rss"] > 0 for r in rows)
  assert "remat" in out.stdout and "x base" in out.stdout  # the table


def test_bench_memory_meshes_shrink_the_per_device_state():
  """--meshes 2: data=2 replicates the train state on both devices, fsdp=2 halves it."""
  out = subprocess.run(
      [sys.executable, "-m", "jaxft.bench.memory", "--meshes", "2", "--", "--config",
       "configs/gpt2.py:tiny", "--config.batch_size=4"],
      cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {(r["mesh.data"], r["mesh.fsdp"], r["mesh.tensor"]): r
          for r in json.loads(out.stdout.strip().splitlines()[-1])}
  assert sorted(rows) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
  data, fsdp = rows[(2, 1, 1)]["train_state"], rows[(1, 2, 1)]["train_state"]
  assert fsdp == pytest.approx(data / 2, rel=0.01)  # everything but the scalars is split
  assert rows[(1, 1, 2)]["train_state"] < data
