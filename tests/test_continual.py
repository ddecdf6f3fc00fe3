"""Continual learning (docs/continual-learning.md): label subsets, the reservoir buffer and replay
mixing, the EWC penalty and Fisher against references written here from the formulas, and a
2-stage class-incremental run of a tiny BERT through the workflow and its forgetting report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import finetune
from jaxft import tasks, trees
from jaxft.data import replay
from jaxft.lifelong import run_continual, workflow
from jaxft.lifelong import stages as stages_lib
from jaxft.run import ewc
from tests.helpers import FILLER, MONEY, SPORT, set_fields, write_csv

FOOD = "bread soup cheese recipe kitchen chef dinner salad baked sauce".split()
WEATHER = "rain storm wind snow cloud sunny forecast cold humid thunder".split()
TOPICS = {"sport": SPORT, "money": MONEY, "food": FOOD, "weather": WEATHER}
LABELS = "food,money,sport,weather"


def _rows(n, seed):
  rng = np.random.default_rng(seed)
  names = list(TOPICS)
  return [{"text": " ".join(rng.choice(TOPICS[names[i % 4]] * 2 + FILLER, size=12)),
           "label": names[i % 4]} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("cl_data")
  return {"train": write_csv(d / "train.csv", _rows(160, 0)),
          "validation": write_csv(d / "val.csv", _rows(40, 1)),
          "test": write_csv(d / "test.csv", _rows(40, 2)), "tfds": str(d / "tfds")}


def _config(tiny_bert, data, **overrides):
  c = finetune.get_config("classification")
  c.init_from = tiny_bert
  c.data.train, c.data.validation, c.data.test = data["train"], data["validation"], data["test"]
  c.data.data_dir = data["tfds"]
  c.seq_len, c.batch_size, c.eval_batch_size = 24, 8, 8
  c.num_epochs, c.optim.lr, c.log_every = 0, 3e-3, 10
  from jaxft.run import loader
  return loader.resolve(set_fields(c, overrides))


def test_label_subset_filters_every_split_keeps_the_head(tiny_bert, data):
  full = tasks.make_task(_config(tiny_bert, data, **{"data.labels": LABELS}))
  part = tasks.make_task(_config(tiny_bert, data, **{"data.labels": LABELS,
                                                     "data.label_subset": "sport, money"}))
  assert part.labels == full.labels == LABELS.split(",")  # the head: every label
  for split in ("train", "validation", "test"):
    want = [e for e in full.splits[split] if e["label"] in ("sport", "money")]
    assert part.splits[split] == want and 0 < len(want) < len(full.splits[split])
  assert set(part.features("test")["labels"]) == {1, 2}  # ids in the full label set
  with pytest.raises(ValueError, match=r"label_subset.*golf"):
    tasks.make_task(_config(tiny_bert, data, **{"data.label_subset": "sport,golf"}))


def test_reservoir_is_uniform_over_the_stream_across_a_saved_stage(tmp_path):
  """Each of 20 stream items (12 in a first stage, the buffer saved and reloaded, 8 in a
  second) ends in a capacity-5 buffer with probability 5/20, over 1000 seeds."""
  counts = np.zeros(20)
  path = str(tmp_path / replay.FILE)
  for seed in range(1000):
    replay.Reservoir(5, seed).extend(range(12)).save(path)
    buffer = replay.Reservoir.load(path, seed).extend(range(12, 20))
    assert buffer.seen == 20 and len(set(buffer.items)) == 5
    counts[buffer.items] += 1
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  # The test has power: keeping the first stage's draws only (no continuation) is not uniform.
  first_only = np.zeros(20)
  for seed in range(500):
    first_only[replay.Reservoir(5, seed).extend(range(12)).items] += 1
  assert stats.chisquare(first_only).pvalue < 1e-6


def test_replay_mixing_ratio_and_bit_exact_resume(tiny_bert, data, tmp_path):
  buffer = replay.Reservoir(7, 0).extend(
      [e for e in _rows(40, 5) if e["label"] in ("sport", "money")])
  buffer.save(str(tmp_path / replay.FILE))
  mixed = replay.mix(list(range(30)), buffer.items, 0.25, seed=3)
  assert len(mixed) == 40 and mixed[:30] == list(range(30))
  uses = [sum(m is b for m in mixed[30:]) for b in buffer.items]
  assert sorted(set(uses)) == [1, 2] and sum(uses) == 10  # each buffer example once per pass
  over = {"data.labels": LABELS, "data.label_subset": "food,weather", "data.shuffle_seed": 1,
          "continual.replay_file": str(tmp_path / replay.FILE), "continual.replay_ratio": 1 / 6}
  task = tasks.make_task(_config(tiny_bert, data, **over))
  own = sum(e["label"] in ("food", "weather") for e in task.splits["train"])
  assert len(task.splits["train"]) == own + own // 5 and (own + own // 5) % 8 == 0
  it = task.train_iterator(seed=1)
  epoch = [next(it) for _ in range(task.num_train_examples() // 8)]
  old = np.isin(np.concatenate([b["labels"] for b in epoch]), [1, 2])  # money, sport
  assert old.sum() == own // 5  # one epoch holds the buffer's share (1/6) exactly
  state = it.get_state()
  following = next(it)
  again = tasks.make_task(_config(tiny_bert, data, **over)).train_iterator(seed=1)
  again.set_state(state)
  resumed = next(again)
  for k in following:
    np.testing.assert_array_equal(resumed[k], following[k])


def _tree(rng):
  return {"a": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                "bias": rng.normal(size=(4,)).astype(np.float32)},
          "b": {"scale": rng.normal(size=(5,)).astype(np.float32)}}


def test_ewc_penalty_by_hand_and_the_file(tmp_path):
  rng = np.random.default_rng(0)
  params, anchor, f1 = _tree(rng), _tree(rng), _tree(rng)
  fisher = {"a": {"kernel": np.abs(f1["a"]["kernel"])}, "b": {"scale": np.abs(f1["b"]["scale"])}}
  by_hand = 0.7 / 2 * (np.sum(fisher["a"]["kernel"] * (params["a"]["kernel"]
                                                       - anchor["a"]["kernel"]) ** 2)
                       + np.sum(fisher["b"]["scale"] * (params["b"]["scale"]
                                                        - anchor["b"]["scale"]) ** 2))
  state = {"fisher": fisher, "anchor": anchor}
  np.testing.assert_allclose(float(ewc.penalty(params, state, 0.7)), by_hand, rtol=1e-5)
  jitted = jax.jit(lambda p: ewc.penalty(p, state, 0.7))
  np.testing.assert_allclose(float(jitted(params)), by_hand, rtol=1e-5)
  # a/bias is not in the Fisher: moving it costs nothing; moving a/kernel does.
  moved = jax.tree.map(np.copy, params)
  moved["a"]["bias"] += 5.0
  assert float(ewc.penalty(moved, state, 0.7)) == pytest.approx(by_hand, rel=1e-5)
  ewc.save(str(tmp_path / ewc.FILE), fisher, anchor)
  loaded = ewc.load(str(tmp_path / ewc.FILE))
  assert {k: v.shape for k, v in trees.flat_paths(loaded["fisher"]).items()} == {
      "a/kernel": (3, 4), "b/scale": (5,)}
  np.testing.assert_array_equal(loaded["anchor"]["b"]["scale"], anchor["b"]["scale"])
  total = ewc.accumulate(loaded, {"a": {"kernel": np.ones((3, 4), np.float32)}}, params)
  np.testing.assert_allclose(total["fisher"]["a"]["kernel"], fisher["a"]["kernel"] + 1)
  np.testing.assert_array_equal(total["fisher"]["b"]["scale"], fisher["b"]["scale"])
  assert total["anchor"] is params  # online EWC: anchored at the newest stage


class _SoftmaxRegression:
  """A task whose loss is softmax regression (logits = x W + b), so numpy has each example's
  gradient in closed form: dW = x (p - onehot(y))^T, db = p - onehot(y)."""

  def loss(self, variables, batch, rng, deterministic=False):
    p = variables["params"]["out"]
    logits = batch["x"] @ p["kernel"] + p["bias"]
    ce = (jax.nn.logsumexp(logits, -1)
          - jnp.take_along_axis(logits, batch["labels"][:, None], -1)[:, 0])
    return jnp.sum(ce * batch["example_mask"]), {"weight": jnp.sum(batch["example_mask"])}


def test_fisher_matches_per_example_gradients_by_hand():
  """11 examples in batches of 8 (the second padded with 5 rows whose bias gradient is not 0:
  they must not count) against the mean of numpy's per-example squared gradients."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(11, 5)).astype(np.float32), rng.integers(0, 3, size=11)
  w, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
  variables = {"params": {"out": {"kernel": w, "bias": b}}}
  pad = 16 - 11
  batch = {"x": np.concatenate([x, np.zeros((pad, 5), np.float32)]),
           "labels": np.concatenate([y, np.zeros(pad, int)]).astype(np.int32),
           "example_mask": np.concatenate([np.ones(11), np.zeros(pad)]).astype(np.float32)}
  batches = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
  fisher = ewc.fisher_diagonal(_SoftmaxRegression(), variables, batches)
  logits = x @ w + b
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  err = p - np.eye(3)[y]
  want_w = np.mean([np.outer(x[n], err[n]) ** 2 for n in range(11)], axis=0)
  np.testing.assert_allclose(fisher["out"]["kernel"], want_w, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(fisher["out"]["bias"], np.mean(err ** 2, axis=0), rtol=1e-4)
  only_kernel = ewc.fisher_diagonal(_SoftmaxRegression(), variables, batches,
                                    trainable_mask={"out": {"kernel": True, "bias": False}})
  assert trees.flat_paths(only_kernel).keys() == {"out/kernel"}


def test_two_stage_run_report_and_rerun(tiny_bert, data, tmp_path, monkeypatch):
  """sport+money, then food+weather: naive forgets the first stage, replay keeps some of it;
  the report's BWT is the formula over its own matrix; a rerun trains nothing."""
  base = _config(tiny_bert, data, num_steps=40, eval_every=40, **{"optim.lr": 1e-2})
  out = run_continual(base, str(tmp_path), ["sport,money", "food,weather"],
                      ["naive", "replay"], replay_ratio=0.3, replay_size=40)
  for name in ("naive", "replay"):
    with open(tmp_path / name / "report.json") as fh:
      r = json.load(fh)
    m = r["accuracy_matrix"]
    assert len(m) == 2 and all(len(row) == 2 for row in m) and m[0][1] is None
    assert r["backward_transfer"] == pytest.approx(m[1][0] - m[0][0])
    assert r["average_accuracy"] == pytest.approx((m[1][0] + m[1][1]) / 2)
    assert r["forgetting"] == [pytest.approx(m[0][0] - m[1][0])]
    # Stage 0 learns its pair; how well 40 steps teach the tiny model stage 1's pair on top
    # varies (not asserted): forgetting is what this measures.
    assert m[0][0] >= 0.9
  # Stage 0 is the same run for both (trained once); stage 1 is each strategy's own.
  assert sorted(os.listdir(tmp_path)) == ["naive", "replay", "report.json", "report.md",
                                          "stage_0"]
  assert os.path.exists(tmp_path / "replay" / "stage_1" / "stage.json")
  with open(tmp_path / "stage_0" / replay.FILE) as fh:
    assert json.loads(fh.readline()) == {"capacity": 40, "seen": 80}
  assert out["naive"]["first_stage_forgetting"] > 0.5  # class-incremental: the old classes go
  assert out["replay"]["first_stage_forgetting"] < out["naive"]["first_stage_forgetting"]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished stage was trained again")

  monkeypatch.setattr(workflow, "train_and_evaluate", no_training)
  again = run_continual(base, str(tmp_path), ["sport,money", "food,weather"],
                        ["naive", "replay"], replay_ratio=0.3, replay_size=40)
  assert again == json.loads(json.dumps(out))
  with pytest.raises(ValueError, match="--stage"):
    run_continual(base, str(tmp_path), ["sport", "food,weather"], ["naive"])


def test_stage_configs_per_strategy(tiny_bert, data, tmp_path):
  """Stage 0 is one config for the full fine-tuning strategies (so they share its run); later
  stages start from the previous stage with that strategy's EWC file or replay buffer; LoRA
  stages all start from the base model."""
  base = _config(tiny_bert, data)
  stages_, labels = [["sport", "money"], ["food", "weather"]], LABELS.split(",")

  def config(strategy, k):
    dirs = stages_lib.stage_dirs(str(tmp_path), strategy, 2)
    return dirs, stages_lib.stage_config(base, dirs, k, stages_, labels,
                                         stages_lib.Options(strategy=strategy))

  firsts = {s: config(s, 0) for s in ("naive", "ewc", "replay")}
  assert len({d[0] for d, _ in firsts.values()}) == 1
  assert len({c.to_json() for _, c in firsts.values()}) == 1
  dirs, ewc_config = config("ewc", 1)
  assert ewc_config.init_from == dirs[0] and ewc_config.data.label_subset == "food,weather"
  assert ewc_config.continual.ewc_file == os.path.join(dirs[0], ewc.FILE)
  assert ewc_config.continual.ewc_weight == stages_lib.Options().ewc_weight
  dirs, replay_config = config("replay", 1)
  assert replay_config.continual.replay_file == os.path.join(dirs[0], replay.FILE)
  assert replay_config.continual.ewc_file == ""
  dirs, lora_config = config("lora", 1)
  assert lora_config.peft.method == "lora" and lora_config.init_from == base.init_from
  assert dirs[0] == str(tmp_path / "lora" / "stage_0")
  with pytest.raises(ValueError, match="--replay_ratio"):
    stages_lib.Options(strategy="replay", replay_ratio=1.0).check()
