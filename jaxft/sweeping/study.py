"""A hyperparameter sweep: an Optuna study in `<sweep_dir>/study.db` (Optuna's own RDB storage on
SQLite, so several machines can share it), one training run per trial in `<sweep_dir>/trial_<n>`.

The objective is the config's early-stopping metric (config.early_stopping.metric, else the
task's default_metric) and direction: the best validation value a trial reached. Every
evaluation reports that metric to Optuna; the MedianPruner stops a trial (through
train_and_evaluate's on_evaluation hook: checkpointed and marked stopped) once it is worse than
the median of earlier trials at the same step.

Resuming: rerunning the same command continues the study. --trials counts every trial of the
study, so only the missing ones run. A trial whose run was interrupted (Ctrl-C, SIGTERM) or
killed (its heartbeat in the study stopped for longer than the grace period) is resumed, not
restarted: it is marked failed and a new trial with the same values is queued; that trial takes
over the old workdir (renamed trial_<old> -> trial_<new>), reports the evaluations already made
to the pruner, and train_and_evaluate continues from the newest checkpoint. A trial that fails
on its own (a NaN loss from a too-high learning rate, a value the config refuses) stays failed
and the sweep goes on.
"""

import logging
import math
import os
import warnings

import jax
import ml_collections
import optuna
from jax.experimental.compilation_cache import compilation_cache

from jaxft import tasks
from jaxft.run import workdir as workdir_lib
from jaxft.sweeping import report, space
from jaxft.training import NonFiniteLossError, train_and_evaluate

log = logging.getLogger("jaxft")

STUDY_FILE = "study.db"
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL)
# Failures that belong to a trial's values (the sweep goes on); anything else stops the sweep.
TRIAL_ERRORS = (NonFiniteLossError, ValueError)


class SweepError(RuntimeError):
  """A mistake in the sweep itself (not one trial's values): the sweep stops."""


def objective_metric(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(metric, "max" | "min"): what early stopping and the best checkpoint follow."""
  metric, mode = tasks.task_class(config.task).default_metric
  es = config.get("early_stopping") or {}
  return es.get("metric") or metric, es.get("mode") or mode


def trial_dir(sweep_dir: str, number: int) -> str:
  return os.path.join(sweep_dir, f"trial_{number}")


def storage_url(sweep_dir: str) -> str:
  return "sqlite:///" + os.path.join(os.path.abspath(sweep_dir), STUDY_FILE)


def _queue_resume(study: optuna.Study, trial) -> None:
  """Queues a trial with the interrupted one's values; it takes over the workdir."""
  study.enqueue_trial(dict(trial.params), user_attrs={"resumes": trial.number},
                      skip_if_exists=False)
  log.warning("trial %d was interrupted; queued a trial with its values to resume %s",
              trial.number, trial.user_attrs.get("workdir", ""))


def open_study(sweep_dir: str, direction: str, specs: list[str], metric: str, *,
               grid: dict | None = None, seed: int = 0, pruner=None,
               heartbeat_interval: int = 60, grace_period: int = 180) -> optuna.Study:
  """The study of sweep_dir (created, or loaded to continue). A study started with other
  --param specs, metric or mode is refused: its trials would not compare."""
  os.makedirs(sweep_dir, exist_ok=True)
  with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        storage_url(sweep_dir), engine_kwargs={"connect_args": {"timeout": 60}},
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        heartbeat_stale_trial_callback=_queue_resume)
  name = os.path.basename(os.path.abspath(sweep_dir))
  # A resumed sweep seeds its sampler past the trials it has, so that TPE's random start-up
  # trials do not repeat the first run's draws.
  study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                              direction="maximize" if direction == "max" else "minimize")
  offset = len(study.get_trials(deepcopy=False))
  if grid is not None:
    study.sampler = optuna.samplers.GridSampler(grid, seed=seed + offset)
  else:
    study.sampler = optuna.samplers.TPESampler(seed=seed + offset)
  study.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2)
  want = {"params": list(specs), "metric": metric, "mode": direction, "grid": grid is not None}
  saved = {k: study.user_attrs.get(k) for k in want}
  if saved["params"] is None:
    for k, v in want.items():
      study.set_user_attr(k, v)
  elif saved != want:
    diff = ", ".join(f"{k} {saved[k]!r} (now {want[k]!r})" for k in want if saved[k] != want[k])
    raise ValueError(f"--sweep_dir={sweep_dir} holds a study started with {diff}: rerun with "
                     "the same --param / --grid / early-stopping settings, or sweep into a new "
                     "--sweep_dir")
  return study


def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` for this process: the trials of a sweep
  compile the same init and evaluation programs (and the same train step where the swept
  fields leave it alone: seeds, data order), which then compile once."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # a cache found off before this call is looked up again


def resumed_numbers(study: optuna.Study) -> set[int]:
  return {t.user_attrs["resumes"] for t in study.get_trials(deepcopy=False)
          if "resumes" in t.user_attrs}


def counted(study: optuna.Study) -> int:
  """Trials that count towards --trials: finished or running, less those resumed by another."""
  resumed = resumed_numbers(study)
  return sum(1 for t in study.get_trials(deepcopy=False)
             if (t.state in DONE or t.state == optuna.trial.TrialState.RUNNING)
             and t.number not in resumed)


def _best(records: list[dict], metric: str, mode: str) -> tuple[float | None, int | None]:
  values = [(r[f"val/{metric}"], r["step"]) for r in records if f"val/{metric}" in r]
  if not values:
    return None, None
  return (max if mode == "max" else min)(values, key=lambda v: v[0])


class Objective:
  """One trial: its values on the base config, its workdir, training with pruning."""

  def __init__(self, base: ml_collections.ConfigDict, params: list[space.Param], sweep_dir: str,
               metric: str, mode: str):
    self.base, self.params, self.sweep_dir = base, params, sweep_dir
    self.metric, self.mode = metric, mode

  def suggest(self, trial) -> dict:
    values = {}
    for p in self.params:
      if p.kind == "choice":
        values[p.name] = trial.suggest_categorical(p.name, p.choices)
      elif p.kind == "int":
        values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
      else:
        values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return values

  def __call__(self, trial: optuna.Trial) -> float:
    values = self.suggest(trial)
    workdir = trial_dir(self.sweep_dir, trial.number)
    resumes = trial.user_attrs.get("resumes")
    if resumes is not None:
      old = trial_dir(self.sweep_dir, resumes)
      if os.path.isdir(old) and not os.path.exists(workdir):
        os.rename(old, workdir)  # atomic on one filesystem: the checkpoints move with it
        log.info("trial %d resumes trial %d's run in %s", trial.number, resumes, workdir)
    trial.set_user_attr("workdir", workdir)
    config = space.apply(self.base, values)
    pruned_at, first = [], []

    def on_evaluation(step: int, val: dict) -> bool:
      if not first:  # a resumed run's evaluations before its checkpoint: the pruner sees all
        first.append(step)
        for r in workdir_lib.read_metrics(workdir):
          if f"val/{self.metric}" in r and r["step"] < step:
            trial.report(float(r[f"val/{self.metric}"]), int(r["step"]))
      value = float(val.get(self.metric, math.nan))
      if math.isfinite(value):
        trial.report(value, step)
      if trial.should_prune():
        pruned_at.append(step)
        return True
      return False

    log.info("trial %d: %s -> %s", trial.number,
             ", ".join(f"{k}={v}" for k, v in values.items()), workdir)
    try:
      train_and_evaluate(config, workdir, on_evaluation=on_evaluation)
    except TRIAL_ERRORS as e:
      trial.set_user_attr("error", str(e).splitlines()[0][:500])
      self._record(trial, workdir)
      raise
    except KeyboardInterrupt:
      self._record(trial, workdir)
      _queue_resume(trial.study, trial)
      raise
    best = self._record(trial, workdir)
    self._check_applied(values, workdir)
    if pruned_at:
      trial.set_user_attr("pruned_at", pruned_at[0])
      raise optuna.TrialPruned(f"worse than the median of earlier trials at step "
                               f"{pruned_at[0]}")
    if best is None:
      raise ValueError(f"{workdir} logged no val/{self.metric}: the run evaluated nothing "
                       "(set config.eval_every below config.num_steps)")
    return best

  def _check_applied(self, values: dict, workdir: str) -> None:
    """The run trained with the trial's values: a field the run sets itself (init_from's
    config.json sets the model's fields) would make the sweep measure nothing."""
    saved = workdir_lib.load_config(workdir)
    for name, value in values.items():
      ran = saved
      for key in name.split("."):
        ran = ran[key]
      if ran != value:
        raise SweepError(f"--param {name}: the run in {workdir} trained with {ran!r}, not the "
                         f"trial's {value!r} (config.init_from's config.json sets the model's "
                         "fields); sweep a field the run does not override")

  def _record(self, trial, workdir: str) -> float | None:
    """The best validation value and the steps run, kept with the trial for the table."""
    records = workdir_lib.read_metrics(workdir)
    best, step = _best(records, self.metric, self.mode)
    if best is not None:
      trial.set_user_attr("best", float(best))
      trial.set_user_attr("best_step", int(step))
    steps = [r["step"] for r in records if "train/loss" in r]
    trial.set_user_attr("steps", max(steps) if steps else 0)
    return best


def run_sweep(base: ml_collections.ConfigDict, specs: list[str], sweep_dir: str, trials: int,
              *, grid: bool = False, seed: int = 0, pruner=None, heartbeat_interval: int = 60,
              grace_period: int = 180, compilation_cache_dir: str | None = None) -> optuna.Study:
  """Runs the study in sweep_dir up to `trials` trials (0 in grid mode: the whole grid);
  returns it. compilation_cache_dir: see use_compilation_cache (the CLI's default:
  <sweep_dir>/jax_cache). The report (trials.csv, trials.md, one plot per parameter) is
  rewritten at the end, also after an interruption."""
  params = space.parse_all(specs, base)
  metric, mode = objective_metric(base)
  grid_space = None
  if grid:
    continuous = [p.spec for p in params if p.continuous]
    if continuous:
      raise space.SpecError(f"--grid takes choice params only; {', '.join(continuous)} is "
                            "continuous: list its values (NAME=choice:A,B,C) or drop --grid")
    grid_space = {p.name: list(p.choices) for p in params}
    size = math.prod(len(v) for v in grid_space.values())
    trials = trials or size
    if trials > size:
      raise ValueError(f"--trials={trials} is more than the grid's {size} points")
  if trials <= 0:
    raise ValueError(f"--trials={trials}: give the number of trials the sweep should have")
  study = open_study(sweep_dir, mode, [p.spec for p in params], metric, grid=grid_space,
                     seed=seed, pruner=pruner, heartbeat_interval=heartbeat_interval,
                     grace_period=grace_period)
  if compilation_cache_dir:
    use_compilation_cache(compilation_cache_dir)
  with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)  # a killed run's trial: queued for resuming
  objective = Objective(base, params, sweep_dir, metric, mode)

  def enough(study, _trial) -> None:
    if counted(study) >= trials:
      study.stop()

  try:
    have = counted(study)
    log.info("sweep %s: %d of %d trials done or running; objective %s (%s)", sweep_dir, have,
             trials, metric, mode)
    if have < trials:
      study.optimize(objective, callbacks=[enough], catch=TRIAL_ERRORS, gc_after_trial=True)
  finally:
    report.write(study, params, sweep_dir, metric, mode)
  return study
