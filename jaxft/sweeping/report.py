"""What a sweep leaves in its directory besides study.db and the trials' workdirs:
trials.csv and trials.md (one row per trial) and metric_vs_params.png (the objective against
each parameter; a log x-axis for log-scaled ones, categories for choices)."""

import csv
import os

import optuna

from jaxft.sweeping import space

CSV_FILE, MARKDOWN_FILE, PLOT_FILE = "trials.csv", "trials.md", "metric_vs_params.png"


def _note(t, resumed_by: dict) -> str:
  a = t.user_attrs
  notes = []
  if t.number in resumed_by:
    notes.append(f"interrupted; resumed by trial {resumed_by[t.number]}")
  if "resumes" in a:
    notes.append(f"resumes trial {a['resumes']}")
  if "pruned_at" in a:
    notes.append(f"pruned at step {a['pruned_at']}")
  if "error" in a:
    notes.append(a["error"])
  return "; ".join(notes)


def rows(study: optuna.Study, params: list[space.Param], sweep_dir: str, metric: str) -> list:
  out = []
  trials = study.get_trials(deepcopy=False)
  resumed_by = {t.user_attrs["resumes"]: t.number for t in trials if "resumes" in t.user_attrs}
  for t in trials:
    if t.state == optuna.trial.TrialState.WAITING:
      continue
    seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete and t.datetime_start else None)
    row = {"trial": t.number, "state": t.state.name.lower()}
    row.update({p.name: t.params.get(p.name, "") for p in params})
    row.update({metric: t.user_attrs.get("best", ""),
                "best_step": t.user_attrs.get("best_step", ""),
                "steps": t.user_attrs.get("steps", ""),
                "seconds": round(seconds, 1) if seconds is not None else "",
                "workdir": os.path.relpath(t.user_attrs["workdir"], sweep_dir)
                if "workdir" in t.user_attrs else "",
                "note": _note(t, resumed_by)})
    out.append(row)
  return out


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v).replace("|", "\\|")


def write(study: optuna.Study, params: list[space.Param], sweep_dir: str, metric: str,
          mode: str) -> list[str]:
  """The table and the plot; returns the plot's x scales (log for log-scaled params)."""
  table = rows(study, params, sweep_dir, metric)
  if not table:
    return []
  columns = list(table[0])
  with open(os.path.join(sweep_dir, CSV_FILE), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(table)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in table]
  done = [r for r in table if r["state"] == "complete"]
  if done:
    best = (max if mode == "max" else min)(done, key=lambda r: r[metric])
    lines += ["", f"Best completed trial: {best['trial']} ({metric} {best[metric]:.4g}; "
              + ", ".join(f"{p.name}={best[p.name]}" for p in params) + ")"]
  with open(os.path.join(sweep_dir, MARKDOWN_FILE), "w") as f:
    f.write("\n".join(lines) + "\n")
  return plot(table, params, os.path.join(sweep_dir, PLOT_FILE), metric, mode)


def plot(table: list[dict], params: list[space.Param], path: str, metric: str,
         mode: str) -> list[str]:
  """One panel per parameter: completed trials as dots, pruned ones as crosses (their best
  before the stop), failed ones left out (no metric). Returns the panels' x scales."""
  import matplotlib  # heavy optional dependency: only for the plot

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # heavy optional dependency

  fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.4), squeeze=False)
  for ax, p in zip(axes[0], params):
    for state, marker in (("complete", "o"), ("pruned", "x")):
      pts = [(r[p.name], r[metric]) for r in table
             if r["state"] == state and r[metric] != "" and r[p.name] != ""]
      if not pts:
        continue
      if p.kind == "choice":  # categories, in the order they were listed
        labels = [str(c) for c in p.choices]
        xs = [labels.index(str(x)) for x, _ in pts]
        ax.set_xticks(range(len(labels)), labels)
      else:
        xs = [x for x, _ in pts]
      ax.scatter(xs, [y for _, y in pts], marker=marker, label=state)
    if p.log:
      ax.set_xscale("log")
    # The searched range, not the sampled one: where the trials fell in it is the point.
    if p.kind == "choice":
      ax.set_xlim(-0.5, len(p.choices) - 0.5)
    elif p.log:
      ax.set_xlim(p.low / 1.2, p.high * 1.2)
    else:
      pad = 0.04 * (p.high - p.low)
      ax.set_xlim(p.low - pad, p.high + pad)
    ax.set_xlabel(p.name)
    ax.set_ylabel(f"best val {metric} ({mode})")
    ax.grid(alpha=0.3)
  if axes[0][0].get_legend_handles_labels()[0]:  # nothing to label when every trial failed
    axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [ax.get_xscale() for ax in axes[0]]
