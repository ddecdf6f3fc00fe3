"""LoRA in Hugging Face PEFT's adapter format (jaxft/hf/peft_adapter.py) against peft itself: a
tiny random Llama (GQA, head_dim != hidden / heads) with LoRA on every projection, exported by
jaxft, gives through `peft.PeftModel.from_pretrained` the logits of jaxft's LoRA model (fp32,
1e-4), for the causal LM and a classifier whose head travels as modules_to_save; the file reads
back bit-identical, the scanned layout writes the same file, export and config.peft.init_adapter
use it, and the errors a user can cause name the config field."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from configs import finetune
from configs import gpt2 as gpt2_configs
from jaxft import export, hf, tasks, trees
from jaxft.hf import peft_adapter
from jaxft.peft import COLLECTION, bind
from jaxft.run import checkpoint, loader
from jaxft.run import workdir as workdir_lib
from tests.helpers import tiny_config

LLAMA = dict(vocab_size=301, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, head_dim=12,
             max_position_embeddings=64, initializer_range=0.3, pad_token_id=0)
TARGETS = r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"
HF_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
LABELS = ["a", "b", "c"]
T = 11


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  path = str(tmp_path_factory.mktemp("llama"))
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(path)
  return path


def _config(base_dir, task="causal_lm", scan=False, **peft):
  config = (gpt2_configs.get_config("tiny") if task == "causal_lm"
            else finetune.get_config("classification"))
  config.init_from = base_dir
  loader.resolve(config)  # config.model from the Llama's config.json
  config.model.scan_layers = scan
  config.seq_len = T
  config.peft.update(dict(method="lora", rank=4, alpha=8.0, dropout=0.1, targets=TARGETS))
  config.peft.update(peft)
  return config


def _variables(config, labels=None, seed=None):
  """(task, its variables: params from init_from, random non-zero LoRA A and B, and a random
  head, so an adapter that were ignored or a head left at its init would show in the logits).
  Built from the abstract layout: a jitted init costs seconds per model."""
  task = tasks.make_task(config, labels=labels)
  abstract = loader.one_device_layout(task).abstract
  rng = np.random.default_rng(seed)

  def random(tree):
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), tree)

  params = hf.load_params(config.init_from, abstract["params"], task.architecture,
                          init_fn=lambda: random(abstract["params"]))
  return task, {"params": params, COLLECTION: random(abstract[COLLECTION])}


def _tokens(batch=2):
  return np.random.default_rng(7).integers(1, LLAMA["vocab_size"], size=(batch, T))


def _theirs(model, tokens, adapter_dir):
  """(base logits, logits with the PEFT adapter) of a transformers model."""
  with torch.no_grad():
    base = model(torch.from_numpy(tokens)).logits.numpy()
    adapted = hf_peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    return base, adapted(torch.from_numpy(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def causal(llama_dir, tmp_path_factory):
  """(config, task, LoRA variables, their PEFT adapter directory)."""
  config = _config(llama_dir)
  task, variables = _variables(config, seed=1)
  out = str(tmp_path_factory.mktemp("adapter"))
  peft_adapter.save_peft_adapter(out, task, variables)
  return config, task, variables, out


def test_peft_reads_the_adapter_as_jaxft_computes_it(llama_dir, causal):
  _, task, variables, out = causal
  written = json.loads(Path(out, "adapter_config.json").read_text())
  assert (written["peft_type"], written["task_type"], written["r"], written["lora_alpha"],
          written["lora_dropout"], written["use_rslora"], written["fan_in_fan_out"],
          written["base_model_name_or_path"], written["modules_to_save"]) == (
              "LORA", "CAUSAL_LM", 4, 8, 0.1, False, False, llama_dir, None)
  assert written["target_modules"] == HF_TARGETS
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  q = "base_model.model.model.layers.1.self_attn.q_proj"
  o = "base_model.model.model.layers.1.self_attn.o_proj"
  assert tensors[f"{q}.lora_A.weight"].shape == (4, 48)
  assert tensors[f"{q}.lora_B.weight"].shape == (6 * 12, 4)
  assert tensors[f"{o}.lora_A.weight"].shape == (4, 6 * 12)
  assert len(tensors) == 2 * 7 * 2  # A and B of 7 modules in 2 layers, nothing else

  tokens = _tokens()
  base, theirs = _theirs(transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval(),
                         tokens, out)
  positions = np.broadcast_to(np.arange(T), tokens.shape)
  ours = np.asarray(bind(task.model, task.peft).apply(variables, tokens, positions))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs - base).max() > 1e-2  # the adapter changes the model
  ours_base = np.asarray(task.model.apply({"params": variables["params"]}, tokens, positions))
  np.testing.assert_allclose(ours_base, base, atol=1e-4, rtol=0)


def test_adapter_reads_back_identical_and_scanned_layers_write_the_same(llama_dir, causal,
                                                                        tmp_path):
  config, task, variables, out = causal
  _, fresh = _variables(config, seed=5)
  loaded = peft_adapter.load_peft_adapter(out, task, fresh)
  assert trees.flat(loaded).keys() == trees.flat(variables).keys()
  for key, value in trees.flat(variables).items():
    np.testing.assert_array_equal(np.asarray(trees.flat(loaded)[key]), value, err_msg=str(key))

  # scan_layers: LoRA leaves [L, ...] stacked here from the loop's, independently of the module
  scan_config = _config(llama_dir, scan=True)
  scan_task, scanned = _variables(scan_config, seed=0)
  loop = trees.flat_paths(variables[COLLECTION])
  stacked = {p: np.stack([loop[p.replace("model/layers/", f"model/layers_{i}/")]
                          for i in range(2)])
             for p in trees.flat_paths(scanned[COLLECTION])}
  assert {p: x.shape for p, x in trees.flat_paths(scanned[COLLECTION]).items()} == {
      p: x.shape for p, x in stacked.items()}
  scanned = {**scanned, COLLECTION: trees.unflat_paths(stacked)}
  peft_adapter.save_peft_adapter(str(tmp_path / "scan"), scan_task, scanned)
  ours, theirs = (load_file(os.path.join(d, "adapter_model.safetensors"))
                  for d in (out, str(tmp_path / "scan")))
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  assert (tmp_path / "scan" / "adapter_config.json").read_text() == Path(
      out, "adapter_config.json").read_text()
  again = peft_adapter.load_peft_adapter(out, scan_task, _variables(scan_config, seed=5)[1])
  for path, value in stacked.items():
    np.testing.assert_array_equal(trees.flat_paths(again[COLLECTION])[path], value)


def test_classifier_head_travels_as_modules_to_save(llama_dir, tmp_path):
  config = _config(llama_dir, task="classification", targets=r"attn/(query|value)$")
  task, variables = _variables(config, labels=LABELS, seed=2)
  peft_adapter.save_peft_adapter(str(tmp_path), task, variables)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (written["task_type"], written["modules_to_save"], written["target_modules"]) == (
      "SEQ_CLS", ["score"], ["q_proj", "v_proj"])
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  np.testing.assert_array_equal(tensors["base_model.model.score.weight"],
                                np.asarray(variables["params"]["score"]["kernel"]).T)
  tokens = _tokens(batch=3)
  hf_model = transformers.LlamaForSequenceClassification.from_pretrained(
      llama_dir, num_labels=3).eval()  # its score head newly initialised, then the adapter's
  _, theirs = _theirs(hf_model, tokens, str(tmp_path))
  ours = np.asarray(bind(task.model, task.peft).apply(variables, tokens, np.ones_like(tokens)))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  fresh = _variables(config, labels=LABELS, seed=5)[1]
  loaded = peft_adapter.load_peft_adapter(str(tmp_path), task, fresh)
  np.testing.assert_array_equal(loaded["params"]["score"]["kernel"],
                                variables["params"]["score"]["kernel"])


# Other families through the same tables: BERT's classifier (nn.Linear, the "bert." prefix, its
# head in modules_to_save) and GPT-2 without its packed c_attn (Conv1D: fan_in_fan_out). Where a
# last name alone would select unadapted modules too (BERT's pooler.dense, GPT-2's mlp.c_proj),
# target_modules says more of the name.
FAMILIES = {
    "bert": (transformers.BertModel, transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64),
             transformers.BertForSequenceClassification, r"attn/(query|key|value|out)$|mlp/",
             ["intermediate.dense", "key", "output.dense", "query", "value"], ["classifier"],
             False),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
        eos_token_id=1),
             transformers.GPT2LMHeadModel, r"attn/out$|mlp/fc$",
             ["attn.c_proj", "c_fc"], None, True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bert_and_gpt2_fall_out_of_the_tables(family, tmp_path):
  base_cls, hf_config, hf_cls, targets, target_modules, saved, fan_in_fan_out = FAMILIES[family]
  torch.manual_seed(0)
  base_cls(hf_config).save_pretrained(tmp_path / "base")
  config = _config(str(tmp_path / "base"), task="causal_lm" if family == "gpt2" else
                   "classification", targets=targets)
  task, variables = _variables(config, labels=None if family == "gpt2" else LABELS, seed=3)
  peft_adapter.save_peft_adapter(str(tmp_path / "adapter"), task, variables)
  written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (written["target_modules"], written["modules_to_save"],
          written["fan_in_fan_out"]) == (target_modules, saved, fan_in_fan_out)
  tokens = _tokens(batch=3) % 300
  kwargs = {"num_labels": 3} if family == "bert" else {}
  hf_model = hf_cls.from_pretrained(tmp_path / "base", **kwargs).eval()
  base, theirs = _theirs(hf_model, tokens, str(tmp_path / "adapter"))
  model = bind(task.model, task.peft)
  ones = np.ones_like(tokens)
  ours = np.asarray(model.apply(variables, tokens, ones) if family == "bert" else
                    model.apply(variables, tokens, np.cumsum(ones, axis=1) - 1))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs - base).max() > 1e-2
  loaded = peft_adapter.load_peft_adapter(str(tmp_path / "adapter"), task,
                                          _variables(config, LABELS, seed=5)[1])
  for key, value in trees.flat(variables).items():
    np.testing.assert_array_equal(trees.flat(loaded)[key], value, err_msg=str(key))


def test_export_and_init_adapter_use_the_format(llama_dir, causal, tmp_path, monkeypatch):
  """export_peft_adapter on a jaxft adapter directory (the trainable variables and the run's
  config, as --adapter_only writes them); config.peft.init_adapter starting a run's LoRA."""
  config, task, variables, out = causal
  run, trained = str(tmp_path / "run"), str(tmp_path / "trained")
  os.makedirs(trained)
  workdir_lib.save_config(trained, config)
  lay = loader.one_device_layout(task)
  checkpoint.save_adapter(run, trained, lay.split(variables)[0])
  export.export_peft_adapter(run, str(tmp_path / "exported"))
  ours, theirs = (load_file(os.path.join(d, "adapter_model.safetensors"))
                  for d in (out, str(tmp_path / "exported")))
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

  # The seed's random init (a jitted init, seconds to compile) matters not here: a cheap one.
  monkeypatch.setattr(loader.state_lib, "random_variables",
                      lambda task, seq_len, seed, lay: _variables(task.config, seed=9)[1])
  started = _config(llama_dir, init_adapter=out)
  initial = jax.device_get(loader.initial_variables(task, started, lay))
  for key, value in trees.flat(variables).items():
    np.testing.assert_array_equal(np.asarray(trees.flat(initial)[key]), value, err_msg=str(key))
  # A run started so opens once its adapter directory is gone: what it loaded trains, so it
  # is in the run's own files.
  started.peft.init_adapter = str(tmp_path / "gone")
  workdir_lib.save_config(run, started)
  for key, value in trees.flat(loader.open_run(run).variables).items():
    np.testing.assert_array_equal(np.asarray(value), trees.flat(variables)[key], err_msg=str(key))
  started.init_from = ""
  with pytest.raises(ValueError, match=r"config\.peft\.init_adapter=.* needs config\.init_from"):
    loader.initial_variables(task, started, lay)


def test_errors_name_the_field(llama_dir, causal, tmp_path):
  config, _, variables, out = causal
  for fields, message in (
      ({"rank": 8}, r"r=4 but config\.peft\.rank=8; set config\.peft\.rank=4"),
      ({"alpha": 16.0}, r"config\.peft\.alpha=16.0 / rank gives 4; set config\.peft\.alpha=8"),
      ({"targets": r"attn/(query|value)$"},
       r"adapts 14 modules and config\.peft\.targets='attn/\(query\|value\)\$' 4 of this "
       r"model.*e\.g\. '\(attn/key\|attn/out\|attn/query\|attn/value\|mlp/down\|mlp/gate\|"
       r"mlp/up\)\$'")):
    task, fresh = _variables(_config(llama_dir, **fields))
    with pytest.raises(ValueError, match=message):
      peft_adapter.load_peft_adapter(out, task, fresh)
  adalora = tasks.make_task(_config(llama_dir, method="adalora", rank=4, init_rank=4))
  for call in (lambda: peft_adapter.save_peft_adapter(str(tmp_path), adalora, variables),
               lambda: peft_adapter.load_peft_adapter(out, adalora, variables)):
    with pytest.raises(ValueError, match=r"'adalora' \(AdaLoRA's .* ADALORA type\): only LoRA"):
      call()
  # GPT-2 packs q, k and v into c_attn: one shared lora_A there, one per kernel in jaxft.
  gpt2 = tiny_config()
  gpt2.peft.update(dict(method="lora", rank=4))
  gpt2_task = tasks.make_task(gpt2)
  gpt2_vars = loader.one_device_layout(gpt2_task).abstract  # shapes are all it reads
  with pytest.raises(ValueError, match=r"packs transformer/h_0/attn/query, transformer/h_0/attn/"
                                       r"key, transformer/h_0/attn/value into one module, "
                                       r"transformer\.h\.0\.attn\.c_attn.*one lora_A shared"):
    peft_adapter.save_peft_adapter(str(tmp_path), gpt2_task, gpt2_vars)
  config = json.loads(Path(out, "adapter_config.json").read_text())
  (tmp_path / "ia3").mkdir()
  (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
  with pytest.raises(ValueError, match=r"is a PEFT IA3 adapter; jaxft reads LoRA"):
    peft_adapter.load_peft_adapter(str(tmp_path / "ia3"), causal[1], variables)
