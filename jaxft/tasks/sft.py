"""Supervised instruction tuning (SFT) of a causal LM on conversations.

Data (jaxft/data/chat_records.py): JSONL of {"messages": [...]} rendered with the tokenizer's
chat template (or config.sft.chat_template), or {"prompt", "completion"} plain text (the
tokenizer's BOS, the prompt, the completion, EOS). The loss is next-token cross-entropy on the
assistant's tokens only, the template's end-of-turn token included so the model learns to stop
(config.sft.loss_on="all": on every token). Several conversations share a row with segment ids
(config.data.packing, on by default): attention stays inside a conversation and positions
restart, so a packed conversation's loss and gradients are its unpacked ones
(tests/test_sft.py). Conversations longer than config.seq_len + 1 tokens are cut, with a
warning that counts them.

Evaluation is the validation loss on assistant tokens; at the end (and before training, for the
starting model) config.sft.eval_answers held-out test conversations are answered greedily from
their prompt (the template's generation prompt, stopping at any EOS id) and the exact-match
accuracy against the reference answer printed with a few samples.
"""

import json
import logging
import os

import numpy as np

from jaxft import peft
from jaxft.data import chat
from jaxft.models import generation
from jaxft.tasks.base import Task
from jaxft.tasks.causal_lm import CausalLM
from jaxft.tasks.labeled import LabeledTask

log = logging.getLogger("jaxft")
BEFORE_FILE = "answers_before_training.json"


def _sft_settings(config) -> tuple[str, str]:
  sft = config.get("sft", {})
  loss_on = sft.get("loss_on", "assistant")
  if loss_on not in ("assistant", "all"):
    raise ValueError(f"config.sft.loss_on={loss_on!r} is unknown; use 'assistant' (the loss on "
                     "the assistant's tokens) or 'all' (every token)")
  return loss_on, sft.get("chat_template", "") or ""


def encode_text_pair(tok, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
  """Plain text, no chat template: (BOS +) prompt + completion + EOS, the completion and EOS
  learned (SFT's prompt/completion records, DPO's text pairs)."""
  bos = [tok.special_id("bos_token")] if "bos_token" in tok.special else []
  head, tail = bos + tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
  return head + tail, [False] * len(head) + [True] * len(tail)


def trim_trailing_whitespace(tok, ids: list[int], learned: list[bool]) -> list[bool]:
  """Unlearns the whitespace a template writes after an answer's end-of-turn token (ChatML's
  "<|im_end|>\n"): generation stops at the end-of-turn token and never produces it."""
  learned = list(learned)
  for i in range(len(ids) - 1, -1, -1):
    last_of_run = learned[i] and (i + 1 == len(ids) or not learned[i + 1])
    j = i
    while last_of_run and j > 0 and learned[j - 1] and not tok.decode([ids[j]]).strip():
      learned[j] = False
      j -= 1
  return learned


class InstructionTuning(LabeledTask, CausalLM):
  name = "sft"
  head = "causal_lm"
  kind = "chat"
  generative = True
  batch_keys = ("targets", "loss_mask")
  token_batch_keys = ("targets", "loss_mask")
  default_seq_len = 1024
  data_defaults = {"train": "", "packing": True}

  def __init__(self, config, labels=None):
    self.loss_on, self.template = _sft_settings(config)
    super().__init__(config, labels)

  # jaxft.bench times the task's own first training batch (CausalLM's are random text).
  benchmark_batch = Task.benchmark_batch

  # -- features ------------------------------------------------------------------------------

  def encode(self, example: dict) -> tuple[list[int], list[bool]]:
    """One SFT record -> (token ids, which of them are learned)."""
    tok = self.tokenizer
    if "messages" in example and self.loss_on == "all":  # no need to find the answers
      template = self.template or tok.chat_template
      if template is None:  # the error encode_conversation gives, naming the tokenizer
        chat.encode_conversation(tok, example["messages"])
      ids = tok.encode(chat.render(template, example["messages"], special_tokens=tok.special))
      return ids, [True] * len(ids)
    if "messages" in example:
      ids, learned = chat.encode_conversation(tok, example["messages"],
                                              template=self.template or None)
      learned = trim_trailing_whitespace(tok, ids, learned)
    else:
      ids, learned = encode_text_pair(tok, example["prompt"], example["completion"])
    if self.loss_on == "all":
      learned = [True] * len(ids)
    return ids, learned

  def featurize(self, examples, split: str, with_labels: bool = True):
    del with_labels
    examples = list(examples)
    t = self.max_len
    pad = self.tokenizer.eos_id or 0
    out = {"inputs": np.full((len(examples), t), pad, np.int32),
           "targets": np.full((len(examples), t), pad, np.int32),
           "loss_mask": np.zeros((len(examples), t), np.float32),
           "segment_ids": np.zeros((len(examples), t), np.int32),
           "token_types": np.zeros((len(examples), t), np.int32)}
    cut, dropped, unlearned = 0, 0, 0
    for i, example in enumerate(examples):
      ids, learned = self.encode(example)
      # Shifted by one: position j reads token j and predicts token j + 1.
      inputs, targets, mask = ids[:-1], ids[1:], learned[1:]
      if len(inputs) > t:
        cut, dropped = cut + 1, dropped + len(inputs) - t
        inputs, targets, mask = inputs[:t], targets[:t], mask[:t]
        unlearned += not any(mask)
      n = len(inputs)
      out["inputs"][i, :n], out["targets"][i, :n] = inputs, targets
      out["loss_mask"][i, :n] = mask
      out["segment_ids"][i, :max(n, 1)] = 1
    if cut:
      log.warning("%d of %d %s conversations are longer than config.seq_len + 1 = %d tokens "
                  "and were cut (%d tokens dropped; %d kept no assistant token to learn): raise "
                  "config.seq_len to keep them whole", cut, len(examples), split, t + 1,
                  dropped, unlearned)
    return out

  # -- prediction: generation, not jaxft.predict ---------------------------------------------

  def prediction_inputs(self, records):
    raise ValueError("an SFT run answers with jaxft.generate (--chat or --prompts_file of "
                     "message lists), not jaxft.predict")

  def predictions(self, examples, features, outputs):
    raise ValueError("an SFT run answers with jaxft.generate, not jaxft.predict")

  # -- held-out answers ------------------------------------------------------------------------

  def answer(self, variables, conversations: list[list[dict]], max_new_tokens: int):
    """Greedy answers to each conversation's last user turn (its last assistant message and
    whatever follows are left out of the prompt)."""
    tok, prompts = self.tokenizer, []
    for messages in conversations:
      last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
      ids, _ = chat.encode_conversation(tok, messages[:last], template=self.template or None,
                                        add_generation_prompt=True)
      prompts.append(ids)
    outs = generation.generate(peft.bind(self.model, self.peft), variables, prompts,
                               max_new_tokens=max_new_tokens, temperature=0.0,
                               eos_id=tok.eos_ids)
    return [tok.decode(o) for o in outs]

  def answer_accuracy(self, variables) -> dict:
    """Exact-match accuracy of greedy answers on the first config.sft.eval_answers test
    conversations, with a few samples."""
    n = int(self.config.get("sft", {}).get("eval_answers", 0))
    conversations = [e["messages"] for e in self.splits["test"][:n] if "messages" in e]
    if not conversations:
      return {}
    max_new = int(self.config.get("sft", {}).get("max_new_tokens", 64))
    answers = self.answer(variables, conversations, max_new)
    right = [a.strip() == m[-1]["content"].strip() for a, m in zip(answers, conversations)]
    samples = [{"prompt": m[-2]["content"], "answer": a, "reference": m[-1]["content"]}
               for a, m in zip(answers[:3], conversations[:3])]
    return {"answers": len(right), "exact_match": float(np.mean(right)), "samples": samples}

  def before_training(self, workdir: str, variables) -> None:
    result = self.answer_accuracy(variables)
    if result:
      with open(os.path.join(workdir, BEFORE_FILE), "w") as f:
        json.dump(result, f, indent=2)
      print(f"before training: exact-match accuracy {result['exact_match']:.3f} on "
            f"{result['answers']} held-out test conversations")

  def finish(self, workdir, variables, val, eval_batches) -> None:
    print(f"final validation loss on assistant tokens {val['loss']:.4f} (next-token accuracy "
          f"{val['accuracy']:.4f})")
    result = self.answer_accuracy(variables)
    if not result:
      return
    before_file = os.path.join(workdir, BEFORE_FILE)
    before = ""
    if os.path.exists(before_file):
      with open(before_file) as f:
        before = f" (before training {json.load(f)['exact_match']:.3f})"
    for s in result["samples"]:
      print(f"--- {s['prompt']!r} -> {s['answer']!r} (reference {s['reference']!r})")
    print(f"exact-match accuracy of greedy answers on {result['answers']} held-out test "
          f"conversations: {result['exact_match']:.3f}{before}")
    with open(os.path.join(workdir, "answers.json"), "w") as f:
      json.dump(result, f, indent=2)
