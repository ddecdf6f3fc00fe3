"""Generation from a trained run, shared by `python -m jaxft.generate` and the server: opening a
run that can generate, and chat conversations rendered with the run's template."""

from jaxft.data import chat
from jaxft.models import generation
from jaxft.run import loader


def open_generator(path: str, step: int | None = None) -> loader.Run:
  """A run that can generate: a causal LM (jaxft workdir, adapter directory or HF directory)."""
  run = loader.open_run(path, step=step)
  if not run.task.generative:
    raise ValueError(f"{path} holds a {run.config.task} model; generation needs a causal LM "
                     "(a run of configs/gpt2.py, llama.py, sft.py or dpo.py, or a Hugging Face "
                     "*ForCausalLM directory)")
  return run


def chat_template(run) -> str | None:
  """The run's own template (an SFT / DPO config's chat_template), else the tokenizer's."""
  for block in ("sft", "dpo"):
    template = run.config.get(block, {}).get("chat_template", "")
    if template:
      return template
  return None


def chat_prompt(run, tok, conversation: list[dict]) -> list[int]:
  """The ids a conversation's next assistant message follows: the run's chat template with its
  generation prompt."""
  return chat.encode_conversation(tok, conversation, template=chat_template(run),
                                  add_generation_prompt=True)[0]


def chat_answers(run, conversations: list[list[dict]], **sampling) -> list[str]:
  """The assistant's next message for each conversation: the chat template with its
  generation prompt, decoding until any of the tokenizer's EOS ids."""
  tok = run.tokenizer()
  ids = [chat_prompt(run, tok, c) for c in conversations]
  outs = generation.generate(run.model, run.variables, ids, eos_id=tok.eos_ids, **sampling)
  return [tok.decode(o) for o in outs]
