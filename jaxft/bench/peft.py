"""PEFT methods side by side on BBC News from all-MiniLM-L6-v2, in one run.

    python -m jaxft.bench.peft [--methods none,lora,adalora,adapter,prefix,prompt] \
        [--workdir runs/bench_peft]

Each method is the user's command, `python -m jaxft.train --config configs/finetune.py:bbc_news
--config.peft.method=M` with the method's defaults (LoRA/AdaLoRA r=8 on W_q, W_v; adapters of
64 after attention and MLP; 20 prefix / prompt vectors; the method's default learning rate),
on the same split, one after the other on this machine. The table: best validation and test
accuracy, trainable parameters, optimizer-state bytes, and trained tokens/s over the training
loop (non-padding tokens of the training batches over the loop's wall time, evaluations
included). "none" is full fine-tuning, the row LoRA is compared with. Last line: JSON.
"""

import json
import os

from absl import app, flags

from jaxft.bench.finetune import run_jaxft

_METHODS = flags.DEFINE_list("methods", ["none", "lora", "adalora", "adapter", "prefix",
                                         "prompt"], "config.peft.method values to run")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_peft", "parent of one run directory per "
                               "method (replaced)")


def table(results: dict[str, dict]) -> str:
  rows = [("method", "val acc", "test acc", "trainable", "trainable %", "optimizer bytes",
           "tokens/s", "wall s")]
  for method, r in results.items():
    rows.append((method, f"{r['val_accuracy']:.4f}", f"{r['test_accuracy']:.4f}",
                 f"{r['params/trainable']:,}", f"{r['params/trainable_percent']:.2f}",
                 f"{r['optimizer/state_bytes']:,}", f"{r['tokens_per_s_loop']:,.0f}",
                 f"{r['wall_s']:.0f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def main(argv):
  del argv
  results = {}
  for method in _METHODS.value:
    workdir = os.path.abspath(os.path.join(_WORKDIR.value, method))
    r = run_jaxft(workdir, (f"--config.peft.method={method}",))
    r.pop("log")
    results[method] = r
    print(f"{method}: test accuracy {r['test_accuracy']:.4f}, "
          f"{r['params/trainable_percent']:.2f}% trainable, {r['wall_s']:.0f} s", flush=True)
  print(table(results))
  if "none" in results and "lora" in results:
    gap = 100 * (results["lora"]["test_accuracy"] - results["none"]["test_accuracy"])
    print(f"LoRA - full fine-tuning: {gap:+.2f} test accuracy points, with "
          f"{results['lora']['params/trainable_percent']:.2f}% of the parameters trainable")
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
