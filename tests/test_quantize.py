"""Weight-only quantisation (jaxft/quant/, python -m jaxft.quantize): one weight against a numpy
reference, every family's matmul weights and embeddings found, quantised models against fp32,
the saved directory through the one loader, predict and generate."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxft import quant, trees
from jaxft.inference import prediction
from jaxft.models import generation
from jaxft.models.registry import build_model
from jaxft.quant import core
from jaxft.quantize import quantize_dir
from jaxft.run import loader
from tests.helpers import ROOT, TINY_BERT, TOKENIZER_FILES


def _ref_quantize(view, axis, qmax):
  """The textbook formula in numpy: scale = max|w| / qmax over the group, q = round(w / scale)
  (half to even), clipped to [-qmax, qmax]."""
  amax = np.abs(view).max(axis=axis, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
  return np.clip(np.round(view / scale), -qmax, qmax).astype(np.int8), scale


def test_int8_per_output_channel_matches_numpy():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(48, 20)).astype(np.float32)
  w[:, 3] = 0.0  # an all-zero channel: scale 1, values 0 (no division by zero)
  qa = quant.quantize(w, core.Layout("kernel"), 8)
  q, scale = _ref_quantize(w, 0, 127)
  np.testing.assert_array_equal(np.asarray(qa.values), q)
  np.testing.assert_array_equal(np.asarray(qa.scale).reshape(20), scale.reshape(20))
  assert qa.values.dtype == jnp.int8 and np.abs(q).max() == 127
  deq = np.asarray(quant.dequantize(qa))
  np.testing.assert_array_equal(deq, q.astype(np.float32) * scale)
  assert np.all(np.abs(deq - w) <= scale / 2 + 1e-7)
  # An embedding table [V, D]: one scale per row (token), over D.
  e = rng.normal(size=(30, 16)).astype(np.float32)
  qe = quant.quantize(e, core.Layout("embedding"), 8)
  q, scale = _ref_quantize(e, 1, 127)
  np.testing.assert_array_equal(np.asarray(qe.values), q)
  np.testing.assert_array_equal(np.asarray(qe.scale).reshape(30), scale.reshape(30))


def test_int4_groups_along_the_input_match_numpy():
  rng = np.random.default_rng(1)
  # DenseGeneral's output projection [heads, head_dim, embed] in a scanned stack [layers, ...]:
  # inputs are heads x head_dim = 32, groups of 8 along them, per layer and output channel.
  w = rng.normal(size=(3, 4, 8, 10)).astype(np.float32)
  qa = quant.quantize(w, core.Layout("kernel", n_batch=1, n_in=2), 4, group_size=8)
  q, scale = _ref_quantize(w.reshape(3, 4, 8, 10), 2, 7)  # [L, G, g, N]: max over g
  assert qa.values.dtype == jnp.uint8 and qa.values.size == w.size // 2  # two per byte
  unpacked = np.asarray(core.unpack_int4(qa.values, w.size)).reshape(q.shape)
  np.testing.assert_array_equal(unpacked, q)
  np.testing.assert_array_equal(np.asarray(qa.scale), scale)
  assert q.min() >= -7 and q.max() <= 7 and qa.group == 8
  np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), (q * scale).reshape(w.shape))
  # Packing: the first half in the low nibbles, the second in the high ones, two's
  # complement, an odd count padded with 0.
  vals = np.array([-8, 7, -1, 0, 3], np.int8)
  packed = core.pack_int4(vals)
  assert packed.tolist() == [0x08, 0x37, 0x0F]
  np.testing.assert_array_equal(np.asarray(core.unpack_int4(jnp.asarray(packed), 5)), vals)


def test_group_size_fallback_and_bad_bits():
  assert core.group_for(384, 4, 128) == 128
  assert core.group_for(344, 4, 128) == 86  # Llama demo's MLP width: nearest divisor
  assert core.group_for(172, 4, 32) == 43
  assert core.group_for(384, 8, 128) == 384  # int8: the whole input (per output channel)
  with pytest.raises(ValueError, match=r"--bits=3 is not supported; use 8 .* or 4"):
    quant.quantize(np.ones((4, 4), np.float32), core.Layout("kernel"), 3)
  with pytest.raises(ValueError, match="--group_size=0 must be a positive"):
    quant.quantize(np.ones((4, 4), np.float32), core.Layout("kernel"), 4, group_size=0)


_FAMILIES = {
    "gpt2": (dict(family="gpt2", vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4),
             ("causal_lm", "classification")),
    "bert": (dict(family="bert", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=16),
             ("masked_lm", "classification", "token_classification", "question_answering")),
    "llama": (dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=16, tie_word_embeddings=False),
              ("causal_lm", "classification")),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_every_matmul_weight_of_every_family_and_head_is_quantised(family):
  """Every kernel and embedding table (projections, MLPs, heads, untied LM heads) is found and
  quantised; norms and biases stay float. A scanned stack keeps its layer axis as a batch axis.
  The quantised model's outputs are the float model's on the dequantised weights (and close to
  the original ones)."""
  import ml_collections
  fields, heads = _FAMILIES[family]
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
  positions = jnp.arange(8)[None].repeat(2, 0)
  rng = np.random.default_rng(1)
  for scan, head in [(False, h) for h in heads] + [(True, heads[0])]:
    model, _ = build_model(ml_collections.ConfigDict({**fields, "scan_layers": scan}), head, 3)
    init = lambda m=model: m.init(jax.random.key(0), tokens, positions)  # noqa: E731
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                          nn.unbox(jax.eval_shape(init))["params"])
    qparams = quant.quantize_params(params, quant.layouts(init), 8)
    flat = trees.flat(qparams)
    for path, w in trees.flat(params).items():
      weight = path[-1] in ("kernel", "embedding")  # flax's names for matmul weights, tables
      assert isinstance(flat[path], quant.QArray) == weight, (head, path, w.shape)
    stacked = [x.layout.n_batch for x in flat.values() if isinstance(x, quant.QArray)]
    assert set(stacked) == ({0, 1} if scan else {0})  # the blocks' weights carry a layer axis
    if scan or head != heads[0]:
      continue  # outputs: once per family (compiling every head costs more than it tells)
    apply = jax.jit(lambda v, m=model: m.apply(v, tokens, positions))
    fp = apply({"params": params})
    wrapped = quant.Dequantized(model)
    q = jax.jit(lambda v, w=wrapped: w.apply(v, tokens, positions))({"params": qparams})
    deq = apply({"params": jax.device_get(quant.dequantize_tree(qparams))})
    fp, q, deq = (jax.tree.leaves(x)[0] for x in (fp, q, deq))
    np.testing.assert_allclose(q, deq, atol=1e-5, rtol=0)  # the same function, float rounding
    err = float(jnp.abs(q - fp).max())
    assert 1e-5 < err < 0.05 * float(jnp.abs(fp).max()), (head, err)  # quantised, and close


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Random-init transformers models saved with save_pretrained: a GPT-2 and a Llama LM, and a
  BERT classifier with all-MiniLM-L6-v2's tokenizer."""
  import torch
  import transformers

  from configs import common
  root = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
      eos_token_id=0)).save_pretrained(root / "gpt2")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
      eos_token_id=0)).save_pretrained(root / "llama")
  transformers.BertForSequenceClassification(transformers.BertConfig(
      **TINY_BERT, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
      label2id={"a": 0, "b": 1, "c": 2})).save_pretrained(root / "bert")
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(common.minilm_dir(), name), root / "bert")
  return root


def _logits(run, tokens):
  positions = jnp.arange(tokens.shape[1])[None].repeat(tokens.shape[0], 0)
  return jax.jit(lambda v: run.model.apply(v, tokens, positions))(run.variables)


@pytest.mark.parametrize("name, bits", [("gpt2", 8), ("llama", 4)])
def test_quantised_lm_saves_loads_bit_exact_and_generates(hf_dirs, tmp_path, name, bits):
  out = tmp_path / f"{name}-int{bits}"
  sizes = quantize_dir(str(hf_dirs / name), str(out), bits, group_size=32)
  assert sizes["quantized_bytes"] < (0.3 if bits == 8 else 0.2) * sizes["fp32_bytes"]
  meta = json.load(open(out / "config.json"))["quantization"]
  assert meta["bits"] == bits and meta["group_size"] == (32 if bits == 4 else None)
  fp, run = loader.open_run(str(hf_dirs / name)), loader.open_run(str(out))
  # What was saved is what quantising gives, bit for bit.
  _, fresh = quant.quantize_run(fp, bits, 32)
  saved, fresh = (jax.tree_util.tree_flatten_with_path(v) for v in (run.variables, fresh))
  assert saved[1] == fresh[1]  # same tree, shapes, bits and layouts (the QArrays' static part)
  for (path, x), (_, y) in zip(saved[0], fresh[0]):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  stored = {x.dtype for x in jax.tree.leaves(run.variables) if x.ndim >= 1 and x.size > 64}
  assert np.dtype(np.int8 if bits == 8 else np.uint8) in stored
  assert quant.weight_bytes(run.variables) == sizes["quantized_bytes"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 300, (2, 10)), jnp.int32)
  a, b = _logits(run, tokens), _logits(fp, tokens)
  assert 1e-5 < float(jnp.abs(a - b).max()) < (0.05 if bits == 8 else 0.3)
  # Sampling through the KV cache: the float model on the dequantised weights, token for token.
  prompts = [[5, 6, 7], [9]]
  new = generation.generate(run.model, run.variables, prompts, max_new_tokens=6, seed=3)
  deq = {"params": jax.device_get(quant.dequantize_tree(run.variables["params"]))}
  assert new == generation.generate(fp.model, deq, prompts, max_new_tokens=6, seed=3)
  assert [len(x) for x in new] == [6, 6]


def test_quantised_classifier_predicts_like_fp32(hf_dirs, tmp_path):
  out = tmp_path / "bert-int8"
  quantize_dir(str(hf_dirs / "bert"), str(out), 8)
  fp, run = loader.open_run(str(hf_dirs / "bert")), loader.open_run(str(out))
  assert run.labels == ["a", "b", "c"] and json.load(open(out / "labels.json")) == run.labels
  records = [{"text": "the match ended with a late goal"}, {"text": "shares fell sharply"}]
  got = prediction.predict(run.task, run.variables, records)
  want = prediction.predict(fp.task, fp.variables, records)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    probs_g = np.array([g["probabilities"][k] for k in run.labels])
    probs_w = np.array([w["probabilities"][k] for k in run.labels])
    np.testing.assert_allclose(probs_g, probs_w, atol=0.02)
    assert not np.array_equal(probs_g, probs_w)  # really the quantised weights


def test_bad_requests_are_refused(hf_dirs, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("saved")
  with pytest.raises(ValueError, match="--out=.* exists and is not an empty directory"):
    quantize_dir(str(hf_dirs / "gpt2"), str(out), 8)
  assert (out / "keep.txt").read_text() == "saved"
  with pytest.raises(ValueError, match="--bits=3 is not supported"):
    quantize_dir(str(hf_dirs / "gpt2"), str(tmp_path / "new"), 3)
  assert not (tmp_path / "new").exists()
  done = tmp_path / "q"
  quantize_dir(str(hf_dirs / "gpt2"), str(done), 8)
  with pytest.raises(ValueError, match="already quantised"):
    quantize_dir(str(done), str(tmp_path / "qq"), 4)
  with pytest.raises(ValueError, match="quantised run .* no checkpoint steps; drop --step"):
    loader.open_run(str(done), step=3)
  os.remove(done / quant.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError, match="no quantized.safetensors"):
    loader.open_run(str(done))


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_the_command_writes_a_run_that_predict_serves(hf_dirs, tmp_path):
  """python -m jaxft.quantize as a user types it, then jaxft.predict's file path on its output
  (one output line per input line)."""
  out = tmp_path / "bert-int4"
  done = _cli("jaxft.quantize", f"--workdir={hf_dirs / 'bert'}", "--bits=4", "--group_size=16",
              f"--out={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "MiB ->" in done.stdout and "int4" in done.stdout
  (tmp_path / "in.txt").write_text("a late goal won the cup\n\nshares fell\n")
  run = loader.open_run(str(out))
  assert prediction.predict_file(run, str(tmp_path / "in.txt"), str(tmp_path / "o.jsonl")) == 3
  rows = [json.loads(x) for x in open(tmp_path / "o.jsonl")]
  assert rows[0]["label"] in ("a", "b", "c") and rows[1]["label"] is None
  again = _cli("jaxft.quantize", f"--workdir={hf_dirs / 'bert'}", "--bits=8", f"--out={out}")
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].startswith(f"jaxft.quantize: --out={out} exists")
