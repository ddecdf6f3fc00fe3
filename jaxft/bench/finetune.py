"""Fine-tuning end to end, jaxft against the transformers (PyTorch) peer, in one run.

    python -m jaxft.bench.finetune [--workdir runs/bench_bbc] [--peer PATH] [--skip_peer] \
        [--seeds 0,1,2] [--peer_runs 2]

Runs `python -m jaxft.train --config configs/finetune.py:bbc_news` (all-MiniLM-L6-v2, BBC News,
3 epochs, batch 16, max_len 128, lr 1e-4, the reference's 80/10/10 split) and then the peer
script (--peer; in the jaxft workspace ../shared/bench/torch_bbc_finetune_ref.py: the same
model, data, split and recipe in transformers), one after the other on the same machine, and
prints both: test accuracy, wall time (everything: start-up, data, compilation, evaluation) and
trained tokens/s: non-padding tokens of the training batches over the training loop's wall time,
per-epoch evaluations included, as the peer measures its own. The last line is one JSON object.

One test example of BBC News is 0.45 points of accuracy, about the spread between seeds, so
`--seeds` repeats the jaxft run per `config.seed` (head init and dropout masks) and
`--peer_runs` repeats the peer (which seeds neither: every run draws a new head and new dropout
masks); each run and the means are printed. Both keep one data order, as the peer does.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app, flags

from jaxft import tasks
from jaxft.data import assets, readers
from jaxft.run import workdir as workdir_lib


def _define_flags() -> None:
  """Only when run as a program: jaxft.bench.peft imports this module."""
  flags.DEFINE_string("workdir", "runs/bench_bbc", "jaxft run directory (replaced)")
  flags.DEFINE_string("peer", "", "the transformers reference script (outside the repository; "
                      "in the jaxft workspace: ../shared/bench/torch_bbc_finetune_ref.py)")
  flags.DEFINE_boolean("skip_peer", False, "only run jaxft")
  flags.DEFINE_list("seeds", ["0"], "config.seed of each jaxft run (several: WORKDIR/seedN)")
  flags.DEFINE_integer("peer_runs", 1, "how many times the peer runs")


def trained_tokens(task, num_steps: int, seed: int) -> int:
  """Non-padding tokens of the batches the run trained on (replays its data iterator)."""
  it = task.train_iterator(seed)
  return int(sum((next(it)["segment_ids"] > 0).sum() for _ in range(num_steps)))


def run_jaxft(workdir: str, overrides: tuple[str, ...] = (),
              config: str = "configs/finetune.py:bbc_news") -> dict:
  """The user's command, as a subprocess: python -m jaxft.train --config `config`, with
  `overrides` (e.g. "--config.peft.method=lora") appended."""
  shutil.rmtree(workdir, ignore_errors=True)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "jaxft.train", "--config", config,
                        "--workdir", workdir, *overrides],
                       cwd=root, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if out.returncode:
    raise RuntimeError(f"jaxft.train failed:\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "report_test.json")) as f:
    test = json.load(f)
  records = workdir_lib.read_metrics(workdir)
  steps = max(r["step"] for r in records)
  config = workdir_lib.load_config(workdir)
  task = tasks.make_task(config, labels=workdir_lib.load_labels(workdir))
  tokens = trained_tokens(task, steps, config.data.shuffle_seed)
  rates = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
  loop_s = sum(r["train/loop_seconds"] for r in records if "train/loop_seconds" in r)
  counts = next(r for r in records if "params/total" in r)
  best_val = max(r["val/accuracy"] for r in records if "val/accuracy" in r)
  return {"test_accuracy": test["accuracy"], "val_accuracy": best_val, "wall_s": wall,
          "steps": steps, **{k: counts[k] for k in ("params/total", "params/trainable",
                                                    "params/trainable_percent",
                                                    "optimizer/state_bytes")},
          "trained_tokens": tokens, "tokens_per_s_train": sum(rates) / len(rates),
          "loop_s": loop_s, "tokens_per_s_loop": tokens / loop_s,
          "tokens_per_s_wall": tokens / wall, "log": out.stdout}


def run_peer(script: str, args: tuple[str, ...] = ()) -> dict:
  """The transformers script on all-MiniLM-L6-v2; `args` name its data (default: BBC News, the
  same files the built-in dataset reads)."""
  args = args or ("--bbc", readers.bbc_root())
  start = time.perf_counter()
  out = subprocess.run([sys.executable, script, *args, "--model", assets.minilm_dir()],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
  wall = time.perf_counter() - start
  if out.returncode:
    raise RuntimeError(f"the peer script failed:\n{out.stderr[-3000:]}")
  test = re.search(r"test_acc=([\d.]+) total_s=(\d+)", out.stdout)
  rates = re.findall(r"train_tok/s=(\d+)", out.stdout)
  return {"test_accuracy": float(test.group(1)), "wall_s": wall,
          "tokens_per_s_wall": float(rates[-1]), "log": out.stdout}


def _mean(runs: list[dict], key: str) -> float:
  return sum(r[key] for r in runs) / len(runs)


def main(argv):
  del argv
  f = flags.FLAGS
  seeds = [int(s) for s in f.seeds]
  if not f.peer and not f.skip_peer:
    raise app.UsageError("give --peer PATH (the transformers reference script, e.g. "
                         "../shared/bench/torch_bbc_finetune_ref.py) or --skip_peer")
  if not seeds or (f.peer_runs < 1 and not f.skip_peer):
    raise app.UsageError("--seeds needs at least one seed and --peer_runs at least 1 "
                         "(or --skip_peer)")
  ours = []
  for seed in seeds:
    workdir = os.path.abspath(f.workdir if len(seeds) == 1 else f"{f.workdir}/seed{seed}")
    run = run_jaxft(workdir, (f"--config.seed={seed}",))
    print(run.pop("log"), end="")
    print(f"jaxft seed {seed}: test accuracy {run['test_accuracy']:.4f} (validation "
          f"{run['val_accuracy']:.4f}), {run['wall_s']:.0f} s in all; trained tokens/s: "
          f"{run['tokens_per_s_loop']:,.0f} over the training loop (compilation and "
          f"evaluations included, the peer's scope), {run['tokens_per_s_train']:,.0f} in the "
          f"train steps alone, {run['tokens_per_s_wall']:,.0f} over the whole process",
          flush=True)
    ours.append({"seed": seed, **run})
  result = {"jaxft": ours}
  if len(ours) > 1:
    print(f"jaxft over {len(ours)} seeds: mean test accuracy "
          f"{_mean(ours, 'test_accuracy'):.4f}, mean trained tokens/s "
          f"{_mean(ours, 'tokens_per_s_loop'):,.0f}")
  if not f.skip_peer:
    peers = []
    for _ in range(f.peer_runs):
      peer = run_peer(os.path.abspath(f.peer))
      print(peer.pop("log"), end="")
      print(f"transformers (PyTorch): test accuracy {peer['test_accuracy']:.4f}, "
            f"{peer['wall_s']:.0f} s in all; {peer['tokens_per_s_wall']:,.0f} trained tokens/s "
            "over its training loop (evaluations included; its own count)", flush=True)
      peers.append(peer)
    if len(peers) > 1:
      print(f"transformers over {len(peers)} runs: mean test accuracy "
            f"{_mean(peers, 'test_accuracy'):.4f}, mean trained tokens/s "
            f"{_mean(peers, 'tokens_per_s_wall'):,.0f}")
    print(f"jaxft / transformers trained tokens/s over the training loop: "
          f"{_mean(ours, 'tokens_per_s_loop') / _mean(peers, 'tokens_per_s_wall'):.2f}x")
    result["transformers"] = peers
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
