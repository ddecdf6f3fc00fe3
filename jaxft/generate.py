"""Samples continuations of prompts from a causal LM (KV cache; jaxft/models/generation.py).

    python -m jaxft.generate --workdir runs/gpt2 --prompt "ROMEO:" --max_new_tokens 60 \
        --temperature 0.8 --top_k 40
    python -m jaxft.generate --init_from /path/to/hf_gpt2_dir --prompt "Hello" --temperature 0

--workdir: a jaxft run of a causal LM (its best, else latest checkpoint, or --step); an
adapter-only directory works too. --init_from: a Hugging Face GPT-2 directory (config.json +
weights; its tokenizer files if it has them, else GPT-2's BPE). Sampling follows transformers'
order: temperature, then top-k, then top-p; temperature 0 is greedy.
"""

from absl import app, flags

from jaxft.models import generation
from jaxft.run import loader


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
  flags.DEFINE_integer("max_new_tokens", 100, "tokens to generate per prompt")
  flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy")
  flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens; 0 = all")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling: smallest token set with this mass; 1 = off")
  flags.DEFINE_integer("seed", 0, "sampling seed")


def open_generator(path: str, step: int | None = None) -> loader.Run:
  """A run that can generate: a causal LM (jaxft workdir, adapter directory or HF directory)."""
  run = loader.open_run(path, step=step)
  if not run.task.generative:
    raise ValueError(f"{path} holds a {run.config.task} model; generation needs a causal LM "
                     "(a run of configs/gpt2.py, or a Hugging Face GPT2LMHeadModel directory)")
  return run


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  prompts = list(prompts)
  if prompts_file:
    with open(prompts_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("give --prompt (repeatable) or --prompts_file; --prompt '' samples "
                         "unconditionally")
  return prompts


def main(argv):
  del argv
  f = flags.FLAGS
  if (f.workdir is None) == (f.init_from is None):
    raise app.UsageError("give exactly one of --workdir (a jaxft run) or --init_from (a Hugging "
                         "Face GPT-2 directory)")
  prompts = read_prompts(f.prompt, f.prompts_file)
  run = open_generator(f.workdir or f.init_from, f.step)
  tok = run.tokenizer()
  ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
  outs = generation.generate(run.model, run.variables, ids, max_new_tokens=f.max_new_tokens,
                             temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                             seed=f.seed, eos_id=tok.eos_id)
  for i, (prompt, out) in enumerate(zip(prompts, outs)):
    print(f"=== sample {i} ===\n{prompt}{tok.decode(out)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
