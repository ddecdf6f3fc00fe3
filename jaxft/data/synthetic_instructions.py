"""Synthetic instructions with checkable answers, for the SFT and DPO CPU demos (configs/sft.py,
configs/dpo.py) and tests: generated, never downloaded, the same for a seed on every machine.

Four string tasks a small model can learn from scratch in minutes and be scored on exactly:
uppercase a word, capitalise it, reverse it, repeat it twice. Words are random strings of
WORD_LENGTH distinct lowercase letters (26P5 = 7.9M of them), so held-out instructions are new
words, not memorised ones; a fixed length puts each answer character at a fixed distance from
its source, which a small model finds within minutes (with lengths varying it has to learn
content lookups first, which took it thousands of steps). Conversations use a
character-level tokenizer with ChatML special tokens and chat template (Qwen's format), so the
demo exercises the same path as a Hugging Face instruct model: template, special tokens,
end-of-turn EOS, loss on assistant tokens only.

Preference pairs (DPO) hold the right answer as `chosen` and a plausible mistake as `rejected`
(the word unchanged, half uppercased, said once).
"""

import json
import os
import random
import shutil
import string
import tempfile

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from jaxft.data.text_builder import default_data_dir

VERSION = 4  # bump when what a seed generates changes (cached datasets rebuild)
SYSTEM = "Answer with the result only."
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# ChatML as Qwen 2.5 writes it, without its tool-calling branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


WORD_LENGTH = 5


def _word(rng: random.Random) -> str:
  return "".join(rng.sample(string.ascii_lowercase, WORD_LENGTH))


# task -> (instruction for a word, the answer, a plausible wrong answer)
TASKS = {
    "upper": (lambda w: f"Uppercase: {w}", str.upper,
              lambda w: w[: len(w) // 2].upper() + w[len(w) // 2:]),
    "capitalize": (lambda w: f"Capitalize: {w}", str.capitalize, lambda w: w),
    "reverse": (lambda w: f"Reverse: {w}", lambda w: w[::-1], lambda w: w),
    "twice": (lambda w: f"Repeat twice: {w}", lambda w: f"{w} {w}", lambda w: w),
}


def _instruction(rng: random.Random):
  task = rng.choice(sorted(TASKS))
  word = _word(rng)
  prompt, right, wrong = TASKS[task]
  wrong_answer = wrong(word)
  if wrong_answer == right(word):  # e.g. a palindrome: make the mistake a real one
    wrong_answer = right(word) + word[0]
  return prompt(word), right(word), wrong_answer


def chats(n: int, seed: int) -> list[dict]:
  """n conversations: a system prompt in a third of them, two exchanges in a fifth."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
    for _ in range(2 if rng.random() < 0.2 else 1):
      question, answer, _ = _instruction(rng)
      messages += [{"role": "user", "content": question},
                   {"role": "assistant", "content": answer}]
    out.append({"messages": messages})
  return out


def preferences(n: int, seed: int) -> list[dict]:
  """n (prompt, chosen, rejected) pairs in the conversational form."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    question, answer, wrong = _instruction(rng)
    out.append({"prompt": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}]})
  return out


def char_tokenizer() -> tokenizers.Tokenizer:
  """One token per character (printable ASCII and newline) plus the ChatML special tokens."""
  chars = ["<unk>", "\n", *[chr(c) for c in range(32, 127)]]
  tok = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)},
                                              unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True)
                          for t in (END_OF_TEXT, IM_START, IM_END)])
  return tok


def write_char_tokenizer(path: str) -> str:
  """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json with the chat
  template, generation_config.json with both EOS ids) that jaxft and transformers load."""
  os.makedirs(path, exist_ok=True)
  tok = char_tokenizer()
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": IM_END,
               "pad_token": END_OF_TEXT, "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
               "model_max_length": 4096}, f, indent=2)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id(IM_END), tok.token_to_id(END_OF_TEXT)],
               "pad_token_id": tok.token_to_id(END_OF_TEXT)}, f, indent=2)
  return path


def char_tokenizer_dir() -> str:
  """The character tokenizer's directory in jaxft's cache, written on first use (atomically:
  several processes may ask at once)."""
  path = os.path.join(os.path.dirname(default_data_dir()), "tokenizers", f"chars-v{VERSION}")
  if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(path))
    write_char_tokenizer(staging)
    try:
      os.rename(staging, path)
    except OSError:  # another process won the race: its copy is the same
      shutil.rmtree(staging, ignore_errors=True)
  return path


def answer_is_right(messages: list[dict], generated: str) -> bool:
  """Exact match of a generated answer with the conversation's last assistant message."""
  return generated.strip() == messages[-1]["content"].strip()
