"""Knowledge distillation (jaxft/run/distill.py): the KD loss against torch's kl_div and
cross_entropy on the same logits, a training run's first logged loss against that formula on the
teacher's and the student's own logits (teacher labels in another order), self-distillation from
the EMA of the student, the EMA recurrence, students started from some of a model's layers, and
the errors."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers

from configs import common, finetune
from configs import gpt2 as gpt2_configs
from jaxft import hf, tasks, train
from jaxft.run import distill, loader, optim
from jaxft.run import state as state_lib
from jaxft.run import workdir as workdir_lib
from tests.helpers import TINY_BERT, TOKENIZER_FILES, set_fields, topic_rows, write_csv

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _torch_kd(teacher, student, weights, temperature):
  """sum of weight * T^2 * KL(teacher_T || student_T), as torch computes it."""
  t = torch.log_softmax(torch.from_numpy(np.asarray(teacher, np.float64)) / temperature, -1)
  s = torch.log_softmax(torch.from_numpy(np.asarray(student, np.float64)) / temperature, -1)
  kl = torch.nn.functional.kl_div(s, t, reduction="none", log_target=True).sum(-1)
  return float((kl * torch.from_numpy(np.asarray(weights, np.float64))).sum()) * temperature ** 2


def test_kl_term_equals_torch_kl_div():
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(2, 6, 5, 11)) * 3
  weights = (rng.random((6, 5)) > 0.3).astype(np.float32)
  for temperature in (1.0, 2.0, 4.0):
    ours = temperature ** 2 * distill.kl_sum(jnp.asarray(teacher, jnp.float32),
                                             jnp.asarray(student, jnp.float32),
                                             jnp.asarray(weights), temperature)
    assert float(ours) == pytest.approx(_torch_kd(teacher, student, weights, temperature),
                                        rel=1e-5)


def test_causal_lm_kd_loss_equals_torch():
  """The LM student's loss: alpha * token CE + (1 - alpha) * T^2 * KL per target token."""
  config = gpt2_configs.get_config("tiny")
  task = tasks.make_task(config)
  variables = task.init(jax.random.key(0), 8)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.model.vocab_size, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 8), np.float32)
  mask[1, 5:] = 0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
           "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, 8), np.int32)}
  student = np.asarray(task.outputs(variables, batch), np.float64)
  teacher = rng.normal(size=student.shape) * 2
  s = distill.Settings("", alpha=0.3, temperature=2.0, ema_decay=0.0)
  loss, aux = distill.make_loss(task, s)(variables, {**batch, distill.TEACHER_LOGITS: teacher},
                                         None, True)
  ce = torch.nn.functional.cross_entropy(torch.from_numpy(student).reshape(-1, student.shape[-1]),
                                         torch.from_numpy(tokens[:, 1:]).long().reshape(-1),
                                         reduction="none")
  ce = float((ce * torch.from_numpy(mask).reshape(-1)).sum())
  kd = _torch_kd(teacher, student, mask, 2.0)
  assert float(aux["mean/ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(aux["mean/kd"]) == pytest.approx(kd, rel=1e-4)
  assert float(loss) == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
  assert float(aux["weight"]) == mask.sum()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A 2-layer random transformers BertModel (the student's start) and a BertForSequence-
  Classification teacher whose labels are (money, sport), both with MiniLM's tokenizer."""
  root = tmp_path_factory.mktemp("distill")
  torch.manual_seed(0)
  base = root / "base"
  transformers.BertModel(transformers.BertConfig(**TINY_BERT, **NO_DROPOUT)).save_pretrained(base)
  teacher = root / "teacher"
  # A wide init: the teacher's classes differ clearly from the student's near-uniform start.
  cfg = transformers.BertConfig(**TINY_BERT, **NO_DROPOUT, num_labels=2, initializer_range=0.5,
                                id2label={0: "money", 1: "sport"},
                                label2id={"money": 0, "sport": 1})
  transformers.BertForSequenceClassification(cfg).save_pretrained(teacher)
  for d in (base, teacher):
    for name in TOKENIZER_FILES:
      shutil.copy(os.path.join(common.minilm_dir(), name), d)
  data = root / "train.csv"
  write_csv(data, topic_rows(48, 0))
  return {"root": root, "base": str(base), "teacher": str(teacher), "train": str(data)}


def _student_config(dirs, tmp_path, **fields):
  config = finetune.get_config("classification")
  return set_fields(config, {
      "init_from": dirs["base"], "init_layers": "1", "data.data_dir": str(tmp_path / "tfds"),
      "data.train": dirs["train"], "data.labels": "sport,money", "seq_len": 16,
      "batch_size": 8, "eval_batch_size": 16, "num_epochs": 0, "eval_every": 100,
      "log_every": 1, "optim.lr": 1e-3, "optim.warmup_fraction": 0.0, **fields})


@pytest.mark.parametrize("cache,accumulate", [(False, 2), (True, 1)])
def test_training_loss_is_the_kd_formula_on_teacher_and_student_logits(dirs, tmp_path, cache,
                                                                        accumulate):
  """The first step's logged loss, CE and KD equal the formula computed from the teacher's own
  logits (its classes in another order than the student's) and the student's initial logits
  on the first training batch; on the fly in the step (per micro-batch of gradient
  accumulation), or cached in the workdir once."""
  config = _student_config(dirs, tmp_path, num_steps=2, grad_accum_steps=accumulate,
                           batch_size=8 * accumulate, **{
      "distill.teacher": dirs["teacher"], "distill.alpha": 0.25, "distill.temperature": 3.0,
      "distill.cache": cache})
  config.model.update(NO_DROPOUT)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [r for r in workdir_lib.read_metrics(str(tmp_path / "run")) if "train/kd" in r]
  assert [r["step"] for r in rows] == [1, 2]

  resolved = loader.resolve(config.copy_and_resolve_references())
  assert resolved.model.num_hidden_layers == 1
  task = tasks.make_task(resolved, labels=["sport", "money"])
  lay = loader.one_device_layout(task)
  student_vars = loader.initial_variables(task, resolved, lay)
  batch = next(task.train_iterator(resolved.data.shuffle_seed))
  student = np.asarray(task.logits(student_vars, batch), np.float64)
  teacher_run = loader.open_run(dirs["teacher"], seq_len=16)
  teacher = np.asarray(teacher_run.task.logits(teacher_run.variables, batch), np.float64)
  teacher = teacher[:, [1, 0]]  # the teacher's (money, sport) in the student's (sport, money)
  n = float(np.sum(batch["example_mask"]))
  ce = float(torch.nn.functional.cross_entropy(
      torch.from_numpy(student), torch.from_numpy(batch["labels"]).long(), reduction="sum")) / n
  kd = _torch_kd(teacher, student, batch["example_mask"], 3.0) / n
  first = rows[0]
  assert first["train/ce"] == pytest.approx(ce, rel=1e-4)
  assert first["train/kd"] == pytest.approx(kd, rel=1e-4)
  assert first["train/loss"] == pytest.approx(0.25 * ce + 0.75 * kd, rel=1e-4)
  cached = tmp_path / "run" / distill.CACHE_FILE
  assert cached.exists() == cache
  if cache:  # every training example's teacher logits, in the student's class order
    saved = np.load(cached)
    assert saved.shape == (len(task.features("train")["inputs"]), 2)
    every = teacher_run.task.logits(teacher_run.variables, task.device_arrays(
        task.features("train")))
    np.testing.assert_allclose(saved, np.asarray(every)[:, [1, 0]], rtol=1e-4, atol=1e-5)


def test_self_distillation_from_the_ema(dirs, tmp_path):
  """Teacher = the EMA of the student: at the first step it is the student itself (KD 0, no
  dropout), then it lags behind; the EMA is in the checkpointed optimizer state."""
  # eval_every 1: a best checkpoint, restored at the end through the abstract state (EMA incl.)
  config = _student_config(dirs, tmp_path, num_steps=2, eval_every=1, **{
      "distill.ema_decay": 0.5, "optim.lr": 1e-2})
  config.model.update(NO_DROPOUT)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  kd = [r["train/kd"] for r in workdir_lib.read_metrics(str(tmp_path / "run"))
        if "train/kd" in r]
  assert kd[0] == pytest.approx(0.0, abs=1e-7) and kd[1] > 1e-4


def test_params_ema_follows_its_recurrence():
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
  tx = optax.chain(optax.sgd(0.1), optim.params_ema(0.9))
  state = tx.init(params)
  expected = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(0)
  for _ in range(4):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * np.asarray(p), expected, params)
  for k in params:
    np.testing.assert_allclose(optim.ema_params(state)[k], expected[k], rtol=1e-6)
  # The restore target of a resume or a best checkpoint holds the EMA, sharded like the params.
  task = tasks.make_task(gpt2_configs.get_config("tiny"))
  lay = loader.one_device_layout(task)
  tx, _ = optim.make_optimizer(task.config.optim, 10, task.peft, ema_decay=0.9)
  abstract = state_lib.abstract_state(lay, tx, state_lib.state_shardings(lay, tx, lay_mesh(lay)))
  assert jax.tree.map(lambda x: x.shape, optim.ema_params(abstract.opt_state)) == jax.tree.map(
      lambda x: x.shape, abstract.params)


def lay_mesh(lay):
  return next(iter(jax.tree.leaves(lay.shardings))).mesh


def test_init_layers_takes_the_named_layers(dirs):
  """config.init_layers="1": the 1-layer model's layer 0 is the checkpoint's layer 1."""
  config = finetune.get_config("classification")
  set_fields(config, {"init_from": dirs["base"], "init_layers": "1", "seq_len": 16})
  config = loader.resolve(config)
  task = tasks.make_task(config, labels=["a", "b"])
  params = loader.initial_variables(task, config, loader.one_device_layout(task))["params"]
  ours = hf.to_hf_tensors(jax.device_get(params), task.architecture)
  theirs = hf.read_tensors(dirs["base"])
  key = "encoder.layer.{}.attention.self.query.weight"
  got = next(v for k, v in ours.items() if k.endswith(key.format(0)))
  np.testing.assert_array_equal(got, theirs[key.format(1)])
  assert not any(".layer.1." in k for k in ours)
  with pytest.raises(ValueError, match=r"config\.init_layers names layers \[7\]"):
    hf.select_layers(theirs, [0, 7])
  set_fields(config, {"init_layers": "0,2"})
  with pytest.raises(ValueError, match=r"config\.init_layers='0,2': .* has 2 layers"):
    loader.resolve(config)
  set_fields(config, {"init_from": ""})
  with pytest.raises(ValueError, match=r"config\.init_layers='0,2' needs config\.init_from"):
    loader.resolve(config)


def test_errors_name_the_field(dirs, tmp_path):
  for fields, match in [({"teacher": "x", "ema_decay": 0.9}, r"config\.distill\.teacher='x' "
                         r"and config\.distill\.ema_decay=0\.9 both set"),
                        ({"teacher": "x", "alpha": 1.5}, r"config\.distill\.alpha=1\.5"),
                        ({"teacher": "x", "temperature": 0.0}, r"config\.distill\.temperature"),
                        ({"ema_decay": 1.0}, r"config\.distill\.ema_decay=1\.0")]:
    with pytest.raises(ValueError, match=match):
      distill.settings(ml_collections.ConfigDict({"distill": common.distill(**fields)}))
  # A teacher with another label set is refused before anything compiles.
  config = _student_config(dirs, tmp_path, num_steps=1, **{
      "distill.teacher": dirs["teacher"], "data.labels": "sport,money,weather"})
  with pytest.raises(ValueError, match=r"teacher and student need the same label set"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not workdir_lib.read_metrics(str(tmp_path / "bad"))
