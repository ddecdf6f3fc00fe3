"""Paraphrase / back-translation augmentation as a preprocessing step: a causal LM that jaxft
can open (a jaxft run, an adapter directory or a Hugging Face *ForCausalLM directory) writes
k paraphrases of each labelled text, and the augmented dataset (the original rows, then the
paraphrased rows with their original's label) goes to a JSONL file that
config.data.train reads like any other classification file (python -m jaxft.augment).

A prompt template holds {text}; with `chat` the filled template is the user's message, rendered
with the run's chat template and its generation prompt (an instruct model), else it is the
plain prompt. Texts are sampled `batch_texts` at a time (each text's prompt k times in one
generate call) with seed `seed + chunk number`, so the output depends only on the inputs, the
model and these settings. A paraphrase is the continuation up to its first line break,
stripped; an empty one is dropped (counted in the summary). Back-translation is the same call
twice: a template that translates, then one that translates back.
"""

import dataclasses
import json
import os

from jaxft.data.readers import read_classification
from jaxft.data.textio import UTF8, Encoding
from jaxft.inference.generating import chat_prompt
from jaxft.models import generation

DEFAULT_TEMPLATE = "Paraphrase the sentence.\nSentence: {text}\nParaphrase:"


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each paraphrase is sampled (jaxft/models/generation.py)."""

  k: int = 2  # paraphrases per text
  max_new_tokens: int = 64
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 0.95
  seed: int = 0
  batch_texts: int = 8  # texts per generate call (k prompts each)

  def check(self):
    if self.k < 1:
      raise ValueError(f"--k={self.k} must be >= 1 (paraphrases per text)")
    if self.batch_texts < 1:
      raise ValueError(f"--batch_texts={self.batch_texts} must be >= 1")


def check_template(template: str) -> None:
  if "{text}" not in template:
    raise ValueError(f"--template={template!r} has no {{text}}: put {{text}} where the text to "
                     "paraphrase goes")


def prompt_ids(run, tok, template: str, text: str, chat: bool) -> list[int]:
  """The token ids a paraphrase of `text` continues."""
  prompt = template.replace("{text}", text)
  if chat:
    return chat_prompt(run, tok, [{"role": "user", "content": prompt}])
  return tok.encode(prompt) or [tok.eos_id]


def first_line(text: str) -> str:
  return text.split("\n", 1)[0].strip()


def _check_length(run, ids: list[list[int]], start: int, sampling: Sampling) -> None:
  cfg = run.model.cfg
  for i, prompt in enumerate(ids[::sampling.k]):
    if len(prompt) + sampling.max_new_tokens > cfg.context_length:
      raise ValueError(
          f"text {start + i} makes a prompt of {len(prompt)} tokens: with --max_new_tokens="
          f"{sampling.max_new_tokens} it outgrows the model's {cfg.context_field}="
          f"{cfg.context_length}; shorten the text or --template, or lower --max_new_tokens")


def paraphrase(run, texts: list[str], template: str = DEFAULT_TEMPLATE, chat: bool = False,
               sampling: Sampling = Sampling()) -> list[list[str]]:
  """k paraphrases of each text (empty strings where the model wrote nothing)."""
  check_template(template)
  sampling.check()
  tok = run.tokenizer()
  out = []
  step = sampling.batch_texts
  for chunk, start in enumerate(range(0, len(texts), step)):
    batch = texts[start:start + step]
    ids = [prompt_ids(run, tok, template, t, chat) for t in batch for _ in range(sampling.k)]
    _check_length(run, ids, start, sampling)
    samples = generation.generate(
        run.model, run.variables, ids, max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        seed=sampling.seed + chunk, eos_id=tok.eos_ids)
    texts_out = [first_line(tok.decode(s)) for s in samples]
    out += [texts_out[i * sampling.k:(i + 1) * sampling.k] for i in range(len(batch))]
  return out


def augment_file(run, input_path: str, output_path: str, text_field: str = "text",
                 label_field: str = "label", template: str = DEFAULT_TEMPLATE,
                 chat: bool = False, sampling: Sampling = Sampling(),
                 encoding: Encoding = UTF8) -> dict:
  """Reads a labelled CSV / TSV / JSONL file, writes output_path (JSONL): every original row
  {"text", "label", "paraphrase_of": null}, then each non-empty paraphrase {"text", "label",
  "paraphrase_of": the original's row number (0-based)}. Returns counts."""
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"--input={input_path} is not a file")
  if os.path.abspath(input_path) == os.path.abspath(output_path):
    raise ValueError(f"--output={output_path} is --input: write the augmented file elsewhere")
  rows = read_classification(input_path, text_field, label_field, encoding)
  if not rows:
    raise ValueError(f"--input={input_path} holds no labelled rows")
  paraphrases = paraphrase(run, [r["text"] for r in rows], template, chat, sampling)
  empty = 0
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"text": r["text"], "label": r["label"], "paraphrase_of": None},
                         ensure_ascii=False) + "\n")
    for i, (r, texts) in enumerate(zip(rows, paraphrases)):
      for text in texts:
        if not text:
          empty += 1
          continue
        f.write(json.dumps({"text": text, "label": r["label"], "paraphrase_of": i},
                           ensure_ascii=False) + "\n")
  written = len(rows) * sampling.k - empty
  return {"originals": len(rows), "paraphrases": written, "empty": empty}
