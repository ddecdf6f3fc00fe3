"""Samples continuations of prompts from a causal LM (KV cache; jaxft/models/generation.py).

    python -m jaxft.generate --workdir runs/gpt2 --prompt "ROMEO:" --max_new_tokens 60 \
        --temperature 0.8 --top_k 40
    python -m jaxft.generate --init_from /path/to/hf_gpt2_dir --prompt "Hello" --temperature 0

--workdir: a jaxft run of a causal LM (its best, else latest checkpoint, or --step); an
adapter-only directory works too. --init_from: a Hugging Face GPT-2 directory (config.json +
weights; its tokenizer files if it has them, else GPT-2's BPE). Sampling follows transformers'
order: temperature, then top-k, then top-p; temperature 0 is greedy.

--prompts_file: one prompt per line (empty lines are skipped), decoded as --encoding (default:
the run's config.data.encoding, the encoding of the text it was trained on; utf-8 for a Hugging
Face directory) with --encoding_errors.

Chat models (an SFT / DPO run, or an instruct model's Hugging Face directory):

    python -m jaxft.generate --workdir runs/sft --chat "Write a haiku about TPUs" [--system ...]
    python -m jaxft.generate --init_from /models/Qwen2.5-0.5B-Instruct --chats_file chats.jsonl

--chat (repeatable) is one user turn; --chats_file holds one conversation per line (a list of
{"role", "content"} messages, or {"messages": [...]}). Each is rendered with the run's chat
template (config.sft.chat_template, else the tokenizer's) and its generation prompt; decoding
stops at any of the model's EOS ids (tokenizer_config.json and generation_config.json: Llama 3's
<|eot_id|>, Qwen's <|im_end|>, Gemma's <end_of_turn>).
"""

import os

from absl import app, flags

from jaxft.data import textio
from jaxft.data.chat_records import check_messages
from jaxft.data.textio import ENCODING_ERRORS, FLAGS_UTF8, Encoding, json_value
from jaxft.inference.generating import chat_answers, open_generator
from jaxft.models import generation
from jaxft.run import cli


def _define_flags() -> None:
  """Only when run as a program: other modules define --workdir too."""
  flags.DEFINE_string("workdir", None, "jaxft training directory to sample from")
  flags.DEFINE_integer("step", None, "checkpoint step in --workdir (default: the best, else "
                       "the latest)")
  flags.DEFINE_string("init_from", None, "local Hugging Face GPT-2 directory (config.json + "
                      "weights; its tokenizer files if it has them, else GPT-2's BPE)")
  flags.DEFINE_multi_string("prompt", [], "prompt text; repeat for a batch; '' samples "
                            "unconditionally (from the EOS token)")
  flags.DEFINE_string("prompts_file", None, "text file with one prompt per line")
  flags.DEFINE_string("encoding", None, "of --prompts_file (any Python codec: utf-8, latin-1, "
                      "...); default the run's config.data.encoding, else utf-8")
  flags.DEFINE_enum("encoding_errors", None, list(ENCODING_ERRORS), "strict: undecodable bytes "
                    "in --prompts_file are an error; replace: decode them as U+FFFD (with a "
                    "warning); default the run's, else strict")
  flags.DEFINE_multi_string("chat", [], "a user message to answer with the chat template; "
                            "repeat for a batch")
  flags.DEFINE_string("system", None, "system message put before each --chat message")
  flags.DEFINE_string("chats_file", None, "JSONL: one conversation (message list) per line")
  flags.DEFINE_integer("max_new_tokens", 100, "tokens to generate per prompt")
  flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy")
  flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens; 0 = all")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling: smallest token set with this mass; 1 = off")
  flags.DEFINE_integer("seed", 0, "sampling seed")


def read_chats(chats: list[str], system: str | None, chats_file: str | None) -> list[list]:
  """--chat messages and --chats_file lines -> conversations (lists of messages)."""
  head = [{"role": "system", "content": system}] if system else []
  conversations = [head + [{"role": "user", "content": text}] for text in chats]
  if chats_file:
    if not os.path.isfile(chats_file):
      raise FileNotFoundError(f"--chats_file={chats_file} is not a file")
    for n, line in textio.read_lines(chats_file):
      if not line.strip():
        continue
      value = json_value(line, chats_file, n, "write one JSON list of messages per line")
      messages = value.get("messages") if isinstance(value, dict) else value
      conversations.append(check_messages(messages, chats_file, n))
  return conversations


_NO_PROMPTS = "give --prompt (repeatable) or --prompts_file; --prompt '' samples unconditionally"


def read_prompts(prompts: list[str], prompts_file: str | None,
                 encoding: Encoding = FLAGS_UTF8) -> list[str]:
  prompts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise FileNotFoundError(f"--prompts_file={prompts_file} is not a file")
    prompts += [line.rstrip("\n") for _, line in textio.read_lines(prompts_file, encoding)
                if line.strip()]
  if not prompts:
    raise app.UsageError(_NO_PROMPTS)
  return prompts


def main(argv):
  del argv
  f = flags.FLAGS
  if (f.workdir is None) == (f.init_from is None):
    raise app.UsageError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging "
                         "Face causal LM directory)")
  chatting = bool(f.chat or f.chats_file)
  if chatting and (f.prompt or f.prompts_file):
    raise app.UsageError("give either --chat / --chats_file (chat template) or --prompt / "
                         "--prompts_file (plain text), not both")
  # Flag mistakes before the model is loaded; the file is read after, in the run's encoding.
  if not chatting and not f.prompt and not f.prompts_file:
    raise app.UsageError(_NO_PROMPTS)
  if chatting:
    with cli.user_errors("generate"):
      conversations = read_chats(f.chat, f.system, f.chats_file)
      run = open_generator(f.workdir or f.init_from, f.step)
      answers = chat_answers(run, conversations, max_new_tokens=f.max_new_tokens,
                             temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                             seed=f.seed)
    for i, (c, answer) in enumerate(zip(conversations, answers)):
      print(f"=== chat {i} ===\n{c[-1]['role']}: {c[-1]['content']}\nassistant: {answer}")
    return
  if f.prompts_file and not os.path.isfile(f.prompts_file):
    raise app.UsageError(f"--prompts_file={f.prompts_file} is not a file")
  with cli.user_errors("generate"):  # a bad run directory, prompts file or setting: one line
    run = open_generator(f.workdir or f.init_from, f.step)
    tok = run.tokenizer()
    prompts = read_prompts(f.prompt, f.prompts_file,
                           Encoding.of_flags(f.encoding, f.encoding_errors, run.config.get("data")))
    ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
  outs = generation.generate(run.model, run.variables, ids, max_new_tokens=f.max_new_tokens,
                             temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                             seed=f.seed, eos_id=tok.eos_ids)
  for i, (prompt, out) in enumerate(zip(prompts, outs)):
    print(f"=== sample {i} ===\n{prompt}{tok.decode(out)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
