"""Hyperparameter sweeps (jaxft/sweeping/): --param specs, a TPE study of real tiny training
runs (one workdir each, the SQLite study, the table and plot), resuming, median pruning through
train_and_evaluate's on_evaluation hook, grid mode, a diverging trial, an interrupted trial."""

import csv
import json
import os
import time

import jax
import optuna
import pytest

from jaxft.run import workdir as workdir_lib
from jaxft.sweeping import SpecError, parse, parse_all, report, run_sweep, space
from jaxft.sweeping import study as study_lib
from jaxft.training import train_and_evaluate
from tests.helpers import train_config

STEPS = 4  # evaluations at steps 2 and 4; checkpoints at 2 and 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A GPT-2 of 9k parameters on a character vocabulary (fast to compile), one shared TFDS
  cache, and one JAX compilation cache for the module's trials (what the CLI sets up)."""
  tmp = tmp_path_factory.mktemp("sweep")
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                           "jax_persistent_cache_min_compile_time_secs")}
  study_lib.use_compilation_cache(str(tmp / "jax_cache"))
  yield train_config(tmp, **{
      "num_steps": STEPS, "eval_every": 2, "checkpoint_every": 2, "eval_batches": 1,
      "sample.max_new_tokens": 0, "data.tokenizer": "builtin:chars", "model.vocab_size": 100,
      "lm_loss_chunk": 0, "model.n_embd": 16, "seq_len": 16, "optim.warmup_steps": 0})
  for k, v in saved.items():
    jax.config.update(k, v)
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()


def _logged(workdir, key="train/loss"):
  return [r["step"] for r in workdir_lib.read_metrics(workdir) if key in r]


def test_specs_parse_typed_and_errors_name_the_param_and_the_fix(base):
  lr = parse("optim.lr=loguniform:1e-5:1e-3")
  assert (lr.kind, lr.low, lr.high, lr.log) == ("loguniform", 1e-5, 1e-3, True)
  assert lr.distribution() == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
  assert parse("peft.rank=int:4:32:4").distribution() == optuna.distributions.IntDistribution(
      4, 32, step=4)
  assert parse("x=choice:4, 8,1e-3,true,gelu").choices == (4, 8, 1e-3, True, "gelu")
  errors = {
      "optim.lr": "not NAME=KIND:ARGS",
      "optim.lr=normal:0:1": "unknown kind 'normal'",
      "optim.lr=loguniform:0:1e-3": "loguniform needs LOW > 0",
      "optim.lr=uniform:1e-3:1e-5": "LOW must be below HIGH",
      "optim.lr=uniform:a:1": "LOW 'a' is not a number",
      "peft.rank=int:4:16:0": "STEP must be positive",
      "peft.rank=choice:4,,8": "choice needs comma-separated values",
  }
  for spec, message in errors.items():
    with pytest.raises(SpecError, match=message):
      parse(spec)
  # Against the base config: unknown fields, groups, types; the fields there are listed.
  with pytest.raises(SpecError, match=r"config.optim.lrr is not a field of optim.*: .*\blr\b"):
    parse_all(["optim.lrr=loguniform:1e-5:1e-3"], base)
  with pytest.raises(SpecError, match="config.optim is a group of fields"):
    parse_all(["optim=choice:1,2"], base)
  with pytest.raises(SpecError, match=r"num_steps is an int .* take 1.0 .*int:LOW:HIGH"):
    parse_all(["num_steps=uniform:1:2.5"], base)
  with pytest.raises(SpecError, match="given twice"):
    parse_all(["seed=choice:0,1", "seed=int:0:3"], base)
  config = space.apply(base, {"optim.lr": 3, "model.n_layer": 1})
  assert config.optim.lr == 3.0 and type(config.optim.lr) is float and base.model.n_layer == 2
  with pytest.raises(SpecError, match="--grid takes choice params only; optim.lr=loguniform"):
    run_sweep(base, ["optim.lr=loguniform:1e-5:1e-3", "seed=choice:0,1"], "unused", 0,
              grid=True)


@pytest.fixture(scope="module")
def tpe_sweep(base, tmp_path_factory):
  """Trial 0 learns (lr 1e-2); the rerun asks for 2 trials and adds trial 1, which barely
  moves (lr 1e-8): the median pruner (one start-up trial) stops it at its first evaluation."""
  sweep = str(tmp_path_factory.mktemp("tpe") / "sweep")
  specs = ["optim.lr=loguniform:1e-8:1e-1", "data.shuffle_seed=int:0:1000"]
  pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
  metric, mode = study_lib.objective_metric(base)
  study = study_lib.open_study(sweep, mode, [parse(s).spec for s in specs], metric)
  study.enqueue_trial({"optim.lr": 1e-2})  # data.shuffle_seed: TPE's draw
  run_sweep(base, specs, sweep, 1, pruner=pruner)
  first = os.stat(os.path.join(sweep, "trial_0", "metrics.jsonl")).st_mtime_ns
  study.enqueue_trial({"optim.lr": 1e-8})
  t = time.perf_counter()
  study = run_sweep(base, specs, sweep, 2, pruner=pruner)
  return sweep, study, first, time.perf_counter() - t


def test_tpe_sweep_writes_a_workdir_per_trial_the_study_table_and_plot(tpe_sweep, base):
  sweep, study, _, _ = tpe_sweep
  assert sorted(f for f in os.listdir(sweep) if f.startswith("trial_")) == ["trial_0", "trial_1"]
  for name in ("study.db", "trials.csv", "trials.md", "metric_vs_params.png"):
    assert os.path.getsize(os.path.join(sweep, name)) > 0, name
  # The study lives in the SQLite file: another process (machine) loads the same trials.
  loaded = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep}/study.db")
  assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE,
                                              optuna.trial.TrialState.PRUNED]
  assert loaded.direction == optuna.study.StudyDirection.MINIMIZE  # causal_lm: val loss
  rows = list(csv.DictReader(open(os.path.join(sweep, "trials.csv"))))
  for t, row in zip(loaded.trials, rows):
    workdir = os.path.join(sweep, f"trial_{t.number}")
    saved = json.load(open(os.path.join(workdir, "config.json")))  # what the run trained with
    assert saved["optim"]["lr"] == t.params["optim.lr"] == float(row["optim.lr"])
    assert saved["data"]["shuffle_seed"] == t.params["data.shuffle_seed"]
    losses = [r["val/loss"] for r in workdir_lib.read_metrics(workdir) if "val/loss" in r]
    assert float(row["loss"]) == pytest.approx(min(losses))
    assert row["workdir"] == f"trial_{t.number}" and row["state"] == t.state.name.lower()
  assert loaded.trials[0].value == pytest.approx(float(rows[0]["loss"]))
  assert 0 <= loaded.trials[0].params["data.shuffle_seed"] <= 1000
  assert "Best completed trial: 0" in open(os.path.join(sweep, "trials.md")).read()
  specs = [parse(s) for s in ("optim.lr=loguniform:1e-8:1e-1", "data.shuffle_seed=int:0:1000")]
  assert report.write(loaded, specs, sweep, "loss", "min") == ["log", "linear"]


def test_rerun_adds_only_the_missing_trial_and_pruning_stops_the_worse_one(tpe_sweep, base):
  sweep, study, first_mtime, _ = tpe_sweep
  # Trial 0 ran once: the rerun did not touch its workdir.
  assert os.stat(os.path.join(sweep, "trial_0", "metrics.jsonl")).st_mtime_ns == first_mtime
  assert _logged(os.path.join(sweep, "trial_0")) == list(range(1, STEPS + 1))
  pruned = study.trials[1]
  assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["pruned_at"] == 2
  # It reported a worse loss at step 2 than trial 0 did, and trained no further.
  assert pruned.intermediate_values[2] > study.trials[0].intermediate_values[2]
  workdir = os.path.join(sweep, "trial_1")
  assert _logged(workdir) == [1, 2] and _logged(workdir, "val/loss") == [2]
  assert "pruned at step 2" in open(os.path.join(sweep, "trials.md")).read()
  # The on_evaluation stop is a stop: rerunning the run does not continue it.
  config = space.apply(base, pruned.params)
  train_and_evaluate(config, workdir)
  assert _logged(workdir) == [1, 2]
  # A third rerun with --trials 2: nothing left to do.
  again = run_sweep(base, ["optim.lr=loguniform:1e-8:1e-1", "data.shuffle_seed=int:0:1000"],
                    sweep, 2)
  assert len(again.trials) == 2
  with pytest.raises(ValueError, match=r"holds a study started with params"):
    run_sweep(base, ["optim.lr=loguniform:1e-5:1e-1"], sweep, 3)


def test_grid_runs_every_point_once_and_a_diverging_trial_fails_alone(base, tmp_path):
  sweep = str(tmp_path / "grid")
  specs = ["optim.lr=choice:1e-2,1e38", "seed=choice:0"]
  study = run_sweep(base, specs, sweep, 0, grid=True)
  assert sorted(t.params["optim.lr"] for t in study.trials) == [1e-2, 1e38]
  assert all(t.params["seed"] == 0 for t in study.trials)
  by_lr = {t.params["optim.lr"]: t for t in study.trials}
  assert by_lr[1e-2].state == optuna.trial.TrialState.COMPLETE
  failed = by_lr[1e38]
  assert failed.state == optuna.trial.TrialState.FAIL and "became" in failed.user_attrs["error"]
  assert "Lower config.optim.lr" in open(os.path.join(sweep, "trials.md")).read()
  assert len(run_sweep(base, specs, sweep, 0, grid=True).trials) == 2  # the grid is done


def test_an_interrupted_trial_resumes_from_its_checkpoint(base, tmp_path, monkeypatch, caplog):
  sweep = str(tmp_path / "interrupted")
  specs = ["optim.lr=choice:1e-2"]

  def ctrl_c_at_the_last_evaluation(config, workdir, on_evaluation):
    def hook(step, val):
      if step == STEPS:  # after the checkpoint of step 2, before that of step 4
        raise KeyboardInterrupt
      return on_evaluation(step, val)
    return train_and_evaluate(config, workdir, on_evaluation=hook)

  monkeypatch.setattr(study_lib, "train_and_evaluate", ctrl_c_at_the_last_evaluation)
  with pytest.raises(KeyboardInterrupt):
    run_sweep(base, specs, sweep, 1)
  monkeypatch.undo()
  with caplog.at_level("INFO", logger="jaxft"):
    study = run_sweep(base, specs, sweep, 1)
  first, resumed = study.trials
  assert first.state == optuna.trial.TrialState.FAIL
  assert resumed.state == optuna.trial.TrialState.COMPLETE
  assert resumed.user_attrs["resumes"] == 0 and resumed.params == first.params
  assert not os.path.exists(os.path.join(sweep, "trial_0"))  # the run moved to trial_1
  assert "resumed from step 2" in caplog.text
  workdir = os.path.join(sweep, "trial_1")
  assert _logged(workdir) == list(range(1, STEPS + 1))  # steps 1-2 were not trained again
  assert sorted(resumed.intermediate_values) == [2, 4]  # step 2 re-reported from the run
  assert "interrupted; resumed by trial 1" in open(os.path.join(sweep, "trials.md")).read()


def test_a_killed_trial_with_a_stale_heartbeat_is_queued_for_resuming(tmp_path):
  """A SIGKILLed process leaves its trial RUNNING; its heartbeat stops. The next sweep marks
  it failed and queues a trial with its values that takes over its workdir."""
  sweep = str(tmp_path / "killed")
  study = study_lib.open_study(sweep, "min", ["optim.lr=choice:0.01"], "loss",
                               heartbeat_interval=1, grace_period=1)
  trial = study.ask({"optim.lr": optuna.distributions.CategoricalDistribution([0.01])})
  study._storage.record_heartbeat(trial._trial_id)
  time.sleep(2.5)  # past the 1 s grace period (SQLite keeps the heartbeat to the second)
  optuna.storages.fail_stale_trials(study)
  killed, queued = study.get_trials()
  assert killed.state == optuna.trial.TrialState.FAIL
  assert queued.state == optuna.trial.TrialState.WAITING
  assert queued.user_attrs["resumes"] == killed.number
  assert study_lib.counted(study) == 0  # the resumed trial does not count towards --trials
