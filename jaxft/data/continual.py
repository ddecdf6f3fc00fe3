"""The data side of continual learning (docs/continual-learning.md): a stage's label subset of
each split, and its training split with a replay buffer's examples mixed in."""

from jaxft.data import replay


def stage_splits(splits: dict, config, kind: str) -> dict:
  """The splits of a stage: config.data.label_subset's examples, the training split with
  config.continual's replay buffer mixed in (shuffled by grain with the rest)."""
  splits = label_subset(splits, config.data.get("label_subset", ""), kind)
  train = with_replay(splits["train"], config.get("continual"),
                      int(config.data.get("shuffle_seed", 0)))
  return {**splits, "train": train}


def label_subset(splits: dict, subset: str, kind: str) -> dict:
  """config.data.label_subset (comma-separated): each split's examples of those labels only, in
  order (a class-incremental stage; the label set, and so the head, stays config.data.labels)."""
  names = {n.strip() for n in subset.split(",") if n.strip()}
  if not names:
    return splits
  if kind != "classification":
    raise ValueError(f"config.data.label_subset={subset!r} applies to classification only (a "
                     f"{kind} example has several labels); set it to ''")
  out = {k: [e for e in v if e["label"] in names] for k, v in splits.items()}
  missing = names - {e["label"] for e in out["train"]}
  if missing:
    raise ValueError(f"config.data.label_subset={subset!r}: no training example has label(s) "
                     f"{sorted(missing)}; name labels the data has")
  return out


def with_replay(train, continual_cfg, seed: int):
  """The training split with config.continual.replay_file's examples mixed in at
  replay_ratio (jaxft/data/replay.py: mix); unchanged without a file or at ratio 0."""
  cl = continual_cfg or {}  # a workdir's config.json from before config.continual: no block
  path, ratio = cl.get("replay_file", ""), float(cl.get("replay_ratio", 0.0))
  if not path or ratio == 0:
    return train
  return replay.mix(train, replay.read_file(path), ratio, seed)
