"""HF interop against transformers' PyTorch GPT2LMHeadModel (random init, save_pretrained)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from configs import gpt2 as gpt2_configs
from jaxft import hf, train
from jaxft.data.tokenizer import load_tokenizer
from jaxft.models.registry import build_model
from tests.helpers import ROOT, train_config

HF_SHAPE = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4)


def _torch_model(seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(**{**HF_SHAPE, **overrides})
  return transformers.GPT2LMHeadModel(config).eval()


def _jaxft_model(path, **model):
  config = gpt2_configs.base_config()
  config.model.update(hf.model_overrides(hf.read_hf_config(path)), **model)
  model, cfg = build_model(config.model)
  return model, cfg


def _expected(model):
  dummy = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), dummy, dummy))["params"])


def _tokens(shape=(3, 24), vocab=HF_SHAPE["vocab_size"], seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int64)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


def _jaxft_logits(model, params, tokens):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(model.apply({"params": params}, tokens.astype(np.int32), positions))


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_import_matches_transformers_logits(tmp_path, weights):
  reference = _torch_model()
  if weights == "model.safetensors":
    reference.save_pretrained(tmp_path)
  else:  # the pickle format older checkpoints (and the hub's original gpt2) ship
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / weights)
  assert (tmp_path / weights).exists()
  model, _ = _jaxft_model(str(tmp_path))
  params = hf.load_hf_params(str(tmp_path), _expected(model))
  tokens = _tokens()
  np.testing.assert_allclose(_jaxft_logits(model, params, tokens),
                             _torch_logits(reference, tokens), atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_equal_logits_and_tokenizer(tmp_path):
  config = gpt2_configs.base_config()
  config.model.update(HF_SHAPE, vocab_size=50257)
  model, cfg = build_model(config.model)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(1), dummy, dummy))["params"]
  tok = load_tokenizer()
  hf.save_hf(str(tmp_path), params, cfg, tok)

  loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
  tokens = _tokens(vocab=50257)
  np.testing.assert_allclose(_torch_logits(loaded, tokens), _jaxft_logits(model, params, tokens),
                             atol=1e-4, rtol=0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = "ROMEO:\nBut soft, what light through yonder window breaks?  It is the east."
  assert hf_tok(text)["input_ids"] == tok.encode(text)
  assert hf_tok.eos_token_id == tok.eos_id == loaded.config.eos_token_id == 50256


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_is_exact(tmp_path, scan_layers):
  """HF -> jaxft -> HF gives back every tensor bit for bit, also through the stacked layout
  of config.model.scan_layers (whose logits equal transformers' too)."""
  reference = _torch_model(seed=3)
  reference.save_pretrained(tmp_path / "in")
  model, cfg = _jaxft_model(str(tmp_path / "in"), scan_layers=scan_layers)
  params = hf.load_hf_params(str(tmp_path / "in"), _expected(model))
  if scan_layers:
    assert params["transformer"]["h"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
  tokens = _tokens()
  np.testing.assert_allclose(_jaxft_logits(model, params, tokens),
                             _torch_logits(reference, tokens), atol=1e-4, rtol=0)
  hf.save_hf(str(tmp_path / "out"), params, cfg)
  again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
  for name, tensor in reference.state_dict().items():
    if name.endswith((".attn.bias", ".attn.masked_bias")):
      continue
    np.testing.assert_array_equal(again.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def test_greedy_20_tokens_equal_transformers_generate(tmp_path):
  from jaxft.models import generation

  reference = _torch_model(seed=5)
  reference.save_pretrained(tmp_path)
  model, _ = _jaxft_model(str(tmp_path))
  params = hf.load_hf_params(str(tmp_path), _expected(model))
  prompt = [17, 256, 3, 999, 42]
  with torch.no_grad():
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0)
  want = out[0, len(prompt):].tolist()
  got = generation.generate(model, params, [prompt], max_new_tokens=20, temperature=0)
  assert got == [want]


def test_shape_mismatch_names_the_tensor(tmp_path):
  _torch_model().save_pretrained(tmp_path)
  config = gpt2_configs.base_config()
  config.model.update(HF_SHAPE, vocab_size=1200)  # not what the checkpoint holds
  model, _ = build_model(config.model)
  with pytest.raises(ValueError, match=r"'wte\.weight'.*\(1000, 64\).*\(1200, 64\)"):
    hf.load_hf_params(str(tmp_path), _expected(model))


def test_missing_tensor_and_unsupported_config_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  _torch_model().save_pretrained(tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["transformer.h.1.mlp.c_fc.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  model, _ = _jaxft_model(str(tmp_path))
  with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
    hf.load_hf_params(str(tmp_path), _expected(model))

  cfg = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(ValueError, match="model_type='t5'"):
    hf.model_overrides({**cfg, "model_type": "t5"})
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
    hf.model_overrides({**cfg, "scale_attn_by_inverse_layer_idx": True})


def test_init_from_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"init_from.*not a directory"):
    hf.read_hf_config(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"init_from.*no config\.json"):
    hf.read_hf_config(str(tmp_path / "empty"))


def test_train_from_hf_then_export_and_generate_clis(tmp_path):
  """init_from an HF dir -> train -> export CLI -> transformers loads it; generate CLI runs."""
  reference = _torch_model(seed=7, vocab_size=50257, n_positions=64, n_embd=32, n_head=2)
  reference.save_pretrained(tmp_path / "hf_in")
  config = train_config(tmp_path, init_from=str(tmp_path / "hf_in"), num_steps=2,
                        eval_every=2, checkpoint_every=2, **{"sample.max_new_tokens": 0})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "jaxft.export", "--workdir", str(workdir),
                        "--out", str(tmp_path / "hf_out")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
  assert exported.config.n_layer == 2 and exported.config.n_embd == 32
  # Two AdamW steps moved the weights away from the HF init, but not far.
  start = reference.state_dict()["transformer.h.0.mlp.c_fc.weight"]
  end = exported.state_dict()["transformer.h.0.mlp.c_fc.weight"]
  assert 0 < (end - start).abs().max() < 0.1

  for source in (["--workdir", str(workdir)], ["--init_from", str(tmp_path / "hf_out")]):
    out = subprocess.run([sys.executable, "-m", "jaxft.generate", *source, "--prompt", "ROMEO:",
                          "--prompt", "Hello", "--max_new_tokens", "5", "--temperature", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=== sample") == 2 and "ROMEO:" in out.stdout
