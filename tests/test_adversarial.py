"""Adversarial training on the token embeddings (jaxft/run/adversarial.py): FGM, PGD and
FreeLB gradients against the same recurrences written in PyTorch on the transformers model
(a forward hook adds the perturbation to the word embeddings), the perturbation's bound, every
family's token embedding, and a training run that logs the perturbed loss."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import common, finetune
from jaxft import train, trees
from jaxft.inference import robustness
from jaxft.models import perturb
from jaxft.run import adversarial, loader, steps
from jaxft.run import workdir as workdir_lib
from tests.helpers import TINY_BERT, TOKENIZER_FILES, set_fields, topic_rows, write_csv

TEXTS = ["striker goal cup match league", "bank shares profit", "the coach said today",
         "market price growth fund investor economy trade"]


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
  """A random transformers BertForSequenceClassification (no dropout) and its directory."""
  path = tmp_path_factory.mktemp("bert_cls")
  torch.manual_seed(0)
  cfg = transformers.BertConfig(**TINY_BERT, num_labels=2, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  model = transformers.BertForSequenceClassification(cfg).eval()
  model.save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(os.path.join(common.minilm_dir(), name), path)
  run = loader.open_run(str(path), seq_len=16)
  examples = [{"text": t, "label": f"LABEL_{i % 2}"} for i, t in enumerate(TEXTS)]
  task = run.task
  batch = task.device_arrays(task.complete(task.featurize(examples, "train")))
  return model, run, batch


def _torch_loss(model, batch, delta):
  """Sum over examples of -log p(label), the word embeddings plus delta."""
  emb = model.bert.embeddings.word_embeddings
  handle = emb.register_forward_hook(lambda m, i, out: out + delta)
  try:
    logits = model(input_ids=torch.from_numpy(batch["inputs"]).long(),
                   attention_mask=torch.from_numpy(batch["segment_ids"]).long(),
                   token_type_ids=torch.from_numpy(batch["token_types"]).long()).logits
  finally:
    handle.remove()
  return torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]).long(),
                                           reduction="sum")


def _unit(g):
  return g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def _project(d, eps):
  return d * torch.clamp(eps / d.flatten(1).norm(dim=1).clamp_min(1e-12), max=1.0)[:, None, None]


def _torch_grads(model, batch, delta):
  """(loss, d loss / d delta, {param name: gradient}) at delta."""
  model.zero_grad()
  delta = delta.clone().requires_grad_(True)
  loss = _torch_loss(model, batch, delta)
  loss.backward()
  return (loss.item(), delta.grad.clone(),
          {n: p.grad.clone() for n, p in model.named_parameters()})


def _reference(model, batch, method, eps, steps, alpha):
  """The method's parameter gradients, written out in torch."""
  shape = (*batch["inputs"].shape, TINY_BERT["hidden_size"])
  zero = torch.zeros(shape)
  _, g, clean = _torch_grads(model, batch, zero)
  if method == "fgm":
    delta = eps * _unit(g)
  else:  # pgd, freelb (init 0): ascents from 0
    delta, passes = _project(alpha * _unit(g), eps), [clean]
    for _ in range(steps - 1):
      _, g, grads = _torch_grads(model, batch, delta)
      passes.append(grads)
      delta = _project(delta + alpha * _unit(g), eps)
    if method == "freelb":
      return {n: sum(p[n] for p in passes) / steps for n in clean}
  _, _, adv = _torch_grads(model, batch, delta)
  return {n: clean[n] + adv[n] for n in clean}


@pytest.mark.parametrize("method,eps,k,alpha", [("fgm", 0.7, 1, 0.0), ("pgd", 0.5, 3, 0.3),
                                                ("freelb", 0.5, 2, 0.4)])
def test_gradients_equal_the_torch_recurrence(hf_classifier, method, eps, k, alpha):
  model, run, batch = hf_classifier
  adv = ml_collections.ConfigDict(common.adversarial(method=method, epsilon=eps, steps=k,
                                                     step_size=alpha or eps))
  grad_fn = jax.jit(steps.gradient_fn(run.task.loss, adversarial=adversarial.settings(
      ml_collections.ConfigDict({"adversarial": adv}))))
  rows = jnp.arange(len(TEXTS), dtype=jnp.int32)
  (loss, aux), grads = grad_fn(run.variables, {}, batch, jax.random.key(0), rows)
  ref = _reference(model, batch, method, eps, k, alpha)
  flat = trees.flat(grads["params"])
  pairs = {("classifier", "kernel"): ("classifier.weight", True),
           ("bert", "word", "embedding"): ("bert.embeddings.word_embeddings.weight", False),
           ("bert", "layer_1", "mlp", "proj", "kernel"): ("bert.encoder.layer.1.output.dense"
                                                         ".weight", True)}
  for path, (name, transpose) in pairs.items():
    theirs = ref[name].numpy()
    np.testing.assert_allclose(flat[path], theirs.T if transpose else theirs, atol=2e-5,
                               rtol=1e-4, err_msg=f"{method}: {name}")
  assert float(aux["mean/adv_loss"]) > 0


def test_fgm_perturbation_and_pgd_bound(hf_classifier):
  model, run, batch = hf_classifier
  loss_of = adversarial.with_deltas(lambda v, b: run.task.loss(v, b, None, True))
  shape = (*batch["inputs"].shape, TINY_BERT["hidden_size"])
  _, g, _ = _torch_grads(model, batch, torch.zeros(shape))
  # One ascent of the step size epsilon from 0 is FGM's epsilon * g / ||g||, per example.
  (delta,) = adversarial.pgd_attack(loss_of, run.variables, batch, epsilon=0.9, steps=1,
                                    step_size=0.9)
  np.testing.assert_allclose(np.asarray(delta), (0.9 * _unit(g)).numpy(), atol=1e-5)
  # Long steps stay inside each example's ball, and the attack raises the loss.
  (delta,) = adversarial.pgd_attack(loss_of, run.variables, batch, epsilon=0.5, steps=4,
                                    step_size=2.0)
  norms = np.linalg.norm(np.asarray(delta).reshape(len(TEXTS), -1), axis=1)
  np.testing.assert_allclose(norms, 0.5, rtol=1e-5)
  clean = float(loss_of(run.variables, None, batch)[0])
  assert float(loss_of(run.variables, [delta], batch)[0]) > clean


def test_a_penalty_counts_once_under_adversarial_training(hf_classifier):
  """A regulariser (AdaLoRA's, EWC's) adds its value and gradient once per step, not once per
  adversarial pass: FGM + penalty = FGM + the penalty's own gradient x the step's weight."""
  _, run, batch = hf_classifier
  adv = adversarial.settings(ml_collections.ConfigDict(
      {"adversarial": common.adversarial(method="fgm", epsilon=0.7)}))
  reg = lambda v: 0.3 * jnp.sum(jnp.square(v["params"]["classifier"]["kernel"]))  # noqa: E731
  args = ({}, batch, jax.random.key(0), jnp.arange(len(TEXTS), dtype=jnp.int32))
  (loss, aux), grads = jax.jit(steps.gradient_fn(run.task.loss, adversarial=adv))(
      run.variables, *args)
  (loss_r, _), grads_r = jax.jit(steps.gradient_fn(run.task.loss, regularizer=reg,
                                                   adversarial=adv))(run.variables, *args)
  weight = float(aux["weight"])
  assert float(loss_r) == pytest.approx(float(loss) + float(reg(run.variables)) * weight,
                                        rel=1e-5)
  expected = jax.tree.map(lambda g, r: g + r * weight, grads, jax.grad(reg)(run.variables))
  for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_family_has_one_token_embedding(family):
  from configs import gpt2, llama
  from jaxft import tasks

  config = (gpt2 if family == "gpt2" else llama).get_config("tiny")
  task = tasks.make_task(config)
  variables = task.init(jax.random.key(0), 8)
  tokens = jnp.ones((2, 8), jnp.int32)
  shapes = perturb.token_embedding_shapes(
      lambda v: task.apply(v, tokens, jnp.broadcast_to(jnp.arange(8), (2, 8))), variables)
  assert [s.shape for s in shapes] == [(2, 8, task.model_cfg.flops_backbone.width)]


def test_errors_name_the_field():
  for fields, match in [({"method": "fgsm"}, r"config\.adversarial\.method='fgsm'"),
                        ({"method": "fgm", "epsilon": 0.0}, r"config\.adversarial\.epsilon"),
                        ({"method": "pgd", "steps": 0}, r"config\.adversarial\.steps=0")]:
    cfg = ml_collections.ConfigDict({"adversarial": common.adversarial(**fields)})
    with pytest.raises(ValueError, match=match):
      adversarial.settings(cfg)


def test_fgm_training_run_and_robustness_check(tmp_path, tiny_bert):
  config = finetune.get_config("classification")
  set_fields(config, {
      "init_from": tiny_bert, "data.data_dir": str(tmp_path / "tfds"), "seq_len": 32,
      "batch_size": 8, "eval_batch_size": 16, "num_epochs": 0, "num_steps": 4,
      "eval_every": 4, "log_every": 2, "optim.lr": 3e-3,
      "data.train": write_csv(tmp_path / "train.csv", topic_rows(64, 0)),
      "adversarial.method": "fgm", "adversarial.epsilon": 1.0})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [r for r in workdir_lib.read_metrics(str(tmp_path / "run")) if "train/adv_loss" in r]
  assert len(rows) == 2
  # The perturbation points up the loss: the perturbed loss is above the clean one.
  assert all(r["train/adv_loss"] > r["train/loss"] for r in rows)

  # The robustness check: the attack raises the loss, the perturbed texts change it.
  run = loader.open_run(str(tmp_path / "run"))
  checks = robustness.Checks(epsilon=20.0, steps=3, typo_rate=0.5, synonym_rate=1.0)
  results = robustness.check(run.task, run.variables, "test", checks)
  assert list(results) == ["clean", "pgd", "typos", "synonyms"]
  assert results["pgd"]["loss"] > results["clean"]["loss"]
  assert results["pgd"]["accuracy"] <= results["clean"]["accuracy"]
  assert results["typos"]["loss"] != results["clean"]["loss"]
  table = robustness.format_table(results, checks, "accuracy")
  assert "PGD on the embeddings (eps 20, 3 steps)" in table and "typos (50% of words)" in table
  texts = [e["text"] for e in run.task.splits["test"]]
  typo = [e["text"] for e in robustness.perturbed_examples(run.task.splits["test"], "typos",
                                                              0.5, 0)]
  assert typo != texts and typo == [e["text"] for e in robustness.perturbed_examples(
      run.task.splits["test"], "typos", 0.5, 0)]
