"""The forgetting report of a continual-learning run (docs/continual-learning.md).

R[k][i] is the test accuracy on stage i's classes after training stage k (i <= k; later stages'
entries are None: not learnt yet). With T stages (Lopez-Paz & Ranzato 2017; Chaudhry et al.
2018):

    average accuracy  ACC = mean_i R[T-1][i]
    backward transfer BWT = mean_{i < T-1} (R[T-1][i] - R[i][i])   (negative: forgetting)
    forgetting        f_i = max_{k < T-1} R[k][i] - R[T-1][i]      (i < T-1)
"""

import json
import os

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def summarize(matrix: list[list[float | None]]) -> dict:
  """ACC, BWT and per-stage forgetting of the accuracy matrix R (T rows of T entries)."""
  t = len(matrix)
  if t == 0 or any(len(row) != t for row in matrix):
    raise ValueError(f"the accuracy matrix must be T x T, got {[len(r) for r in matrix]}")
  last = matrix[-1]
  acc = sum(last) / t
  bwt = sum(last[i] - matrix[i][i] for i in range(t - 1)) / (t - 1) if t > 1 else 0.0
  forgetting = [max(matrix[k][i] for k in range(i, t - 1)) - last[i] for i in range(t - 1)]
  return {"average_accuracy": acc, "backward_transfer": bwt, "forgetting": forgetting}


def _fmt(x) -> str:
  return "–" if x is None else f"{x:.4f}"


def write(directory: str, strategy: str, stages: list[list[str]], matrix: list[list]) -> dict:
  """report.json and report.md of one strategy's run; returns the JSON dict."""
  out = {"strategy": strategy, "stages": stages, "accuracy_matrix": matrix,
         **summarize(matrix)}
  with open(os.path.join(directory, REPORT_JSON), "w") as f:
    json.dump(out, f, indent=2)
  names = [" + ".join(s) for s in stages]
  lines = [f"# Continual learning: {strategy}", "",
           "Test accuracy on each stage's classes (columns) after training each stage (rows).",
           "", "| after \\ on | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for k, row in enumerate(matrix):
    lines.append(f"| stage {k}: {names[k]} | " + " | ".join(_fmt(x) for x in row) + " |")
  lines += ["", f"- average accuracy after the last stage: {out['average_accuracy']:.4f}",
            f"- backward transfer: {out['backward_transfer']:+.4f}",
            "- forgetting per stage: " + (", ".join(
                f"{names[i]} {f:.4f}" for i, f in enumerate(out["forgetting"])) or "–")]
  with open(os.path.join(directory, REPORT_MD), "w") as f:
    f.write("\n".join(lines) + "\n")
  return out


def write_comparison(directory: str, reports: dict[str, dict]) -> dict:
  """report.json / report.md beside the strategies' folders: one row per strategy, with each
  one's forgetting of the first stage as a fraction of naive fine-tuning's (when naive ran)."""
  naive = reports.get("naive")
  rows = {}
  for name, r in reports.items():
    first = r["forgetting"][0] if r["forgetting"] else 0.0
    rows[name] = {"average_accuracy": r["average_accuracy"],
                  "backward_transfer": r["backward_transfer"],
                  "first_stage_forgetting": first,
                  "forgetting_vs_naive": (first / naive["forgetting"][0]
                                          if naive and naive["forgetting"]
                                          and naive["forgetting"][0] > 0 else None),
                  "accuracy_matrix": r["accuracy_matrix"]}
  with open(os.path.join(directory, REPORT_JSON), "w") as f:
    json.dump(rows, f, indent=2)
  lines = ["# Continual learning: strategies compared", "",
           "| strategy | average accuracy | BWT | stage-0 forgetting | vs naive |",
           "|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['average_accuracy']:.4f} | {r['backward_transfer']:+.4f} | "
                 f"{r['first_stage_forgetting']:.4f} | {_fmt(r['forgetting_vs_naive'])} |")
  with open(os.path.join(directory, REPORT_MD), "w") as f:
    f.write("\n".join(lines) + "\n")
  return rows
