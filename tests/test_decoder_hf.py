"""The decoder family (Llama, Mistral, Qwen 2/3, Gemma 1/2/3) against transformers' PyTorch
classes, random init at small odd shapes (GQA ratio 3, head_dim != hidden / heads, rope
scaling, sliding windows shorter than the sequence): logits within 1e-4 fp32 both ways, and
greedy continuations of a left-padded batch identical to transformers' `generate`."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxft import hf
from jaxft.models import generation, registry

SHAPE = dict(vocab_size=301, hidden_size=48, intermediate_size=88, num_hidden_layers=3,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
             initializer_range=0.3)  # wide enough that random models do not repeat one token
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# transformers class -> what its config adds to SHAPE (each family's distinctive features on).
CAUSAL = {
    "LlamaForCausalLM": dict(head_dim=12, rope_scaling=LLAMA3_ROPE, attention_bias=True,
                             mlp_bias=True),
    "MistralForCausalLM": dict(head_dim=12, sliding_window=5),
    "Qwen2ForCausalLM": dict(tie_word_embeddings=True, use_sliding_window=True,
                             sliding_window=6, max_window_layers=1,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "Qwen3ForCausalLM": dict(head_dim=12),
    "GemmaForCausalLM": dict(head_dim=12),
    # Gemma 2 / 3 scale embeddings by sqrt(d) and cap logits: a narrower init stays varied.
    "Gemma2ForCausalLM": dict(head_dim=12, sliding_window=5, initializer_range=0.02,
                              query_pre_attn_scalar=10, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0),
    "Gemma3ForCausalLM": dict(head_dim=12, sliding_window=5, sliding_window_pattern=2,
                              initializer_range=0.02,
                              query_pre_attn_scalar=10,
                              rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
T = 17


def _hf_model(architecture: str, seed: int = 0, **extra):
  cls = getattr(transformers, architecture)
  torch.manual_seed(seed)
  model = cls(cls.config_class(**{**SHAPE, **extra})).eval()
  with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def _jaxft(path: str, architecture: str, scan: bool = False, num_labels: int = 0):
  overrides = hf.model_overrides(hf.read_hf_config(path))
  head = "classification" if num_labels else "causal_lm"
  module, _ = registry.build_model(ml_collections.ConfigDict({**overrides, "scan_layers": scan}),
                                   head, num_labels)
  dummy = jnp.zeros((1, T), jnp.int32)
  args = (dummy, dummy) if not num_labels else (dummy,)
  abstract = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *args))["params"])
  return module, hf.load_params(path, abstract, architecture)


def _tokens(seed=0, batch=2):
  return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], size=(batch, T))


def _logits(module, params, tokens):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions)))


@pytest.fixture(scope="module", params=sorted(CAUSAL))
def causal(request, tmp_path_factory):
  """(architecture, HF model, its save_pretrained directory)."""
  architecture = request.param
  model = _hf_model(architecture, **CAUSAL[architecture])
  path = str(tmp_path_factory.mktemp(architecture))
  model.save_pretrained(path)
  return architecture, model, path


def test_hf_to_jaxft_logits(causal):
  architecture, model, path = causal
  tokens = _tokens()
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens)).logits.numpy()
  for scan in (False, True):  # scanned layers: the per-layer window / rotary choice is traced
    module, params = _jaxft(path, architecture, scan)
    np.testing.assert_allclose(_logits(module, params, tokens), theirs, atol=1e-4, rtol=0)


def test_jaxft_to_hf_logits(causal, tmp_path):
  """Changed weights exported with save_hf: transformers reads back the jaxft model."""
  architecture, _, path = causal
  module, params = _jaxft(path, architecture)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  out = str(tmp_path / "export")
  hf.save_hf(out, params, module.cfg, architecture=architecture)
  reread = getattr(transformers, architecture).from_pretrained(out).eval()
  tokens = _tokens(seed=1)
  with torch.no_grad():
    theirs = reread(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(_logits(module, params, tokens), theirs, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(causal):
  """20 greedy tokens of a left-padded batch through the KV cache (GQA, sliding windows
  shorter than prompt + continuation), for the loop and the scanned layouts."""
  architecture, model, path = causal
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, 301, size=7).tolist(), rng.integers(3, 301, size=4).tolist()]
  ids = torch.tensor([prompts[0], [0] * 3 + prompts[1]])
  mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  theirs = out[:, 7:].tolist()
  assert len(set(theirs[0])) > 2, "a degenerate reference would prove little"
  for scan in (False, True):
    module, params = _jaxft(path, architecture, scan)
    assert generation.generate(module, params, prompts, max_new_tokens=20,
                               temperature=0.0) == theirs


def test_incremental_logits_equal_a_full_forward(causal, tmp_path):
  """Prefill then one token at a time through the cache: each step's logits equal the full
  forward's at that position within 1e-5 (Gemma 3: scanned, alternating windows). At the
  transformers default init (0.02), where logits have the magnitude of a trained model's."""
  architecture, _, _ = causal
  _hf_model(architecture, **{**CAUSAL[architecture], "initializer_range": 0.02}).save_pretrained(
      tmp_path)
  module, params = _jaxft(str(tmp_path), architecture, scan=architecture == "Gemma3ForCausalLM")
  tokens = jnp.asarray(_tokens(seed=2, batch=1))
  full = _logits(module, params, np.asarray(tokens))
  dummy = jnp.zeros((1, T), jnp.int32)
  cache = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, dummy, decode=True))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache["cache"])
  split = 6
  steps = [(0, split)] + [(i, i + 1) for i in range(split, T)]
  for start, end in steps:
    positions = jnp.arange(start, end)[None]
    logits, mutated = module.apply({"params": params, "cache": cache}, tokens[:, start:end],
                                   positions, jnp.ones((1, end - start), jnp.int32),
                                   decode=True, mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(np.asarray(logits), full[:, start:end], atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ["LlamaForSequenceClassification",
                                          "Qwen2ForSequenceClassification"])
def test_sequence_classification_both_ways(architecture, tmp_path):
  extra = dict(head_dim=12, pad_token_id=0, num_labels=3)
  model = _hf_model(architecture, **extra)
  model.save_pretrained(tmp_path / "hf")
  module, params = _jaxft(str(tmp_path / "hf"), architecture, num_labels=3)
  tokens = _tokens(seed=4, batch=3)
  tokens[tokens == 0] = 1
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0  # right padding with pad_token_id, which HF's head skips
  mask[2, 4:] = 0
  tokens = np.where(mask == 1, tokens, 0)
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  hf.save_hf(str(tmp_path / "out"), params, module.cfg, architecture=architecture,
             labels=["a", "b", "c"])
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  config["pad_token_id"] = 0
  (tmp_path / "out" / "config.json").write_text(json.dumps(config))
  reread = getattr(transformers, architecture).from_pretrained(tmp_path / "out").eval()
  assert reread.config.id2label == {0: "a", 1: "b", 2: "c"}
  with torch.no_grad():
    back = reread(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
  np.testing.assert_allclose(ours, back, atol=1e-4, rtol=0)


def test_published_config_files_read_as_transformers_reads_them():
  """config.json as the Hub's Llama 3.2 and Qwen 2.5 files write it (rope_theta +
  rope_scaling, no rope_parameters) and the refusal of a rope type jaxft lacks."""
  llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
           "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
           "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "tie_word_embeddings": True,
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "vocab_size": 128256, "rms_norm_eps": 1e-5}
  out = hf.model_overrides(llama)
  assert (out["rope_type"], out["rope_factor"], out["rope_theta"]) == ("llama3", 32.0, 500000.0)
  assert out["tie_word_embeddings"] and out["num_key_value_heads"] == 8
  qwen = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
          "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
          "tie_word_embeddings": True, "vocab_size": 151936}
  out = hf.model_overrides(qwen)
  assert out["attention_bias"] and not out["attention_out_bias"] and out["sliding_window"] == 0
  with pytest.raises(ValueError, match=r"rope_scaling=.*yarn.*default, linear and llama3"):
    hf.model_overrides({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_sharded_safetensors_load(causal, tmp_path):
  """A checkpoint saved in several safetensors shards (model.safetensors.index.json) loads as
  the single file does."""
  architecture, model, path = causal
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  _, whole = _jaxft(path, architecture)
  _, sharded = _jaxft(str(tmp_path), architecture)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(a, b)
