"""DPO (config.task='dpo'): the loss equals the formula computed from transformers' log-probs
of a tiny Llama (policy and reference), and a LoRA run end to end (the reference computed once,
saved, read back by evaluation)."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from configs import dpo as dpo_configs
from jaxft import hf, tasks
from jaxft.data import synthetic_instructions
from jaxft.run import loader
from tests.helpers import eval_outputs, open_trained

PAIRS = [
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse: abc"}],
     "chosen": [{"role": "assistant", "content": "cba"}],
     "rejected": [{"role": "assistant", "content": "abc"}]},
    {"prompt": [{"role": "user", "content": "Uppercase: dog"},
                {"role": "assistant", "content": "DOG"},
                {"role": "user", "content": "Repeat twice: ox"}],
     "chosen": "ox ox", "rejected": "ox"},
    {"prompt": [{"role": "user", "content": "Sort the letters: cab"}],
     "chosen": [{"role": "assistant", "content": "abc"}],
     "rejected": [{"role": "assistant", "content": "cba"}]},
]


def _llama(seed, path, tokenizer_dir):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128,
                                    initializer_range=0.2, tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(path)
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(f"{tokenizer_dir}/{name}", path)
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(reference dir and model, policy dir and model): two random tiny Llamas with the
  character-level ChatML tokenizer."""
  chars = synthetic_instructions.write_char_tokenizer(str(tmp_path_factory.mktemp("chars")))
  ref_dir, policy_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("policy")
  return (str(ref_dir), _llama(0, ref_dir, chars)), (str(policy_dir), _llama(1, policy_dir, chars))


def _config(tmp_path, init_from, **dpo):
  config = dpo_configs.get_config("preferences")
  config.init_from = init_from
  config.data.train = str(tmp_path / "prefs.jsonl")
  (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 4))
  config.data.validation_fraction = 0.25
  config.data.test_fraction = 0.25
  config.data.data_dir = str(tmp_path / "tfds")
  config.seq_len = 120
  config.lm_loss_chunk = 8  # the fused head, per row
  config.dpo.update(dpo)
  return loader.resolve(config)  # config.model and the tokenizer from init_from


def _hf_completion_logp(model, tokenizer, pair) -> float:
  """Sum of log p(completion token) by transformers, the completion found by the prompt's
  rendering with the generation prompt (no jaxft code involved)."""
  answer = pair["chosen"]
  if isinstance(answer, str):
    answer = [{"role": "assistant", "content": answer}]
  prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True)
  full = tokenizer.apply_chat_template(pair["prompt"] + answer)
  prompt, full = list(prompt["input_ids"]), list(full["input_ids"])
  assert full[:len(prompt)] == prompt
  end = len(full)
  while tokenizer.decode(full[end - 1:end]).strip() == "":  # ChatML's "\n" after <|im_end|>
    end -= 1
  with torch.no_grad():
    logits = model(torch.tensor([full])).logits[0].double()
  logp = F.log_softmax(logits, dim=-1)
  return float(sum(logp[t - 1, full[t]] for t in range(len(prompt), end)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_loss_equals_the_formula_on_transformers_log_probs(models, tmp_path, label_smoothing):
  (ref_dir, ref), (policy_dir, policy) = models
  beta = 0.3
  task = tasks.make_task(_config(tmp_path, ref_dir, beta=beta, label_smoothing=label_smoothing))
  arch = task.architecture
  abstract = jax.eval_shape(lambda: task.init(jax.random.key(0), 120))["params"]
  load = lambda path: {"params": hf.load_params(path, jax.tree.map(  # noqa: E731
      lambda x: getattr(x, "value", x), abstract, is_leaf=lambda x: hasattr(x, "value")), arch)}
  task.prepare(str(tmp_path), load(ref_dir))  # the reference: the starting model
  batch = task.eval_batches("train")[0]
  loss_sum, aux = task.loss(load(policy_dir), batch, None, deterministic=True)

  tokenizer = transformers.AutoTokenizer.from_pretrained(ref_dir)
  n = int(aux["weight"])
  examples = list(task.splits["train"])[:n]
  expected, rewards_right = [], 0
  for pair in examples:
    logps = {}
    for side in ("chosen", "rejected"):
      one = {**pair, "chosen": pair[side]}
      logps[side] = (_hf_completion_logp(policy, tokenizer, one),
                     _hf_completion_logp(ref, tokenizer, one))
    z = beta * ((logps["chosen"][0] - logps["rejected"][0])
                - (logps["chosen"][1] - logps["rejected"][1]))
    z = torch.tensor(z, dtype=torch.float64)
    expected.append(float(-(1 - label_smoothing) * F.logsigmoid(z)
                          - label_smoothing * F.logsigmoid(-z)))
    rewards_right += (logps["chosen"][0] - logps["chosen"][1]
                      > logps["rejected"][0] - logps["rejected"][1])
  np.testing.assert_allclose(float(loss_sum) / n, np.mean(expected), rtol=1e-4, atol=1e-5)
  assert int(aux["correct"]) == rewards_right


def test_lora_dpo_run_end_to_end(models, tmp_path, capsys):
  from jaxft.training import train_and_evaluate

  (ref_dir, _), _ = models
  config = _config(tmp_path, ref_dir)
  config.peft.method = "lora"
  config.num_epochs, config.num_steps, config.batch_size = 0, 4, 8
  config.eval_every = 2
  workdir = tmp_path / "run"
  val = train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "before training (policy = reference)" in out and "reward accuracy 0.000 ->" in out
  assert (workdir / "dpo_reference.npz").exists()
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in logged if "train/margin" in r]
  assert train and all(np.isfinite(r["train/chosen_logp"]) for r in train)
  # Opening the run (as jaxft.evaluate does) reads the reference log-probs back.
  _, task, variables = open_trained(workdir)
  again = task.summarize(eval_outputs(task, variables, task.eval_batches("validation")))
  assert again["reward_accuracy"] == pytest.approx(val["reward_accuracy"])
  assert again["margin"] == pytest.approx(val["margin"], rel=1e-4, abs=1e-6)
