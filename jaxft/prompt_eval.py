"""Zero- and few-shot prompting from the command line: a causal LM classifies by scoring each
label's words (the method, its prompt format and its output: jaxft/inference/prompting.py).

    python -m jaxft.prompt_eval --workdir runs/gpt2 --train train.jsonl --test test.jsonl --k 4
    python -m jaxft.prompt_eval --init_from /path/to/hf_gpt2_dir --dataset bbc_news --k 0 \
        --verbalizer business=Business,entertainment=Entertainment,politics=Politics,\
sports=Sport,tech=Technology --scoring mean --output report.json
"""

from absl import app, flags

from jaxft.data.prompts import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, unescape
from jaxft.data.textio import ENCODING_ERRORS
from jaxft.inference.prompt_scoring import SCORINGS
from jaxft.inference.prompting import SPLITS, Options, run
from jaxft.run import cli


def _define_flags() -> None:
  """Only when run as a program (other modules define --workdir too)."""
  flags.DEFINE_string("workdir", None, "jaxft run of configs/gpt2.py (causal LM) to prompt")
  flags.DEFINE_integer("step", None, "checkpoint step in --workdir (default: the best/latest)")
  flags.DEFINE_string("init_from", None, "local Hugging Face GPT-2 directory instead")
  flags.DEFINE_string("dataset", None, "built-in dataset (bbc_news); default bbc_news unless "
                      "--train is given")
  flags.DEFINE_string("train", "", "your .csv/.tsv/.jsonl training file (demonstrations)")
  flags.DEFINE_string("validation", "", "validation file ('' = carved from --train)")
  flags.DEFINE_string("test", "", "test file ('' = carved from --train)")
  flags.DEFINE_string("text_field", "text", "column / JSON field holding the text")
  flags.DEFINE_string("label_field", "label", "column / JSON field holding the label")
  flags.DEFINE_float("validation_fraction", 0.1, "share of --train carved into validation")
  flags.DEFINE_float("test_fraction", 0.1, "share of --train carved into test")
  flags.DEFINE_integer("split_seed", 0, "shuffle seed for carving splits")
  flags.DEFINE_string("encoding", "utf-8", "of the data files (any Python codec: latin-1, "
                      "cp1252, ...)")
  flags.DEFINE_enum("encoding_errors", "strict", list(ENCODING_ERRORS), "strict: undecodable "
                    "bytes are an error; replace: decode them as U+FFFD (with a warning)")
  flags.DEFINE_string("data_dir", "", "TFDS cache ('' = $JAXFT_DATA_DIR or ~/.cache/jaxft/tfds)")
  flags.DEFINE_enum("split", "test", list(SPLITS), "split to score")
  flags.DEFINE_integer("max_examples", None, "score this many examples of the split (drawn "
                       "with --seed); default all")
  flags.DEFINE_string("labels", "", "comma-separated label order of the report; default sorted")
  flags.DEFINE_integer("k", 0, "in-context examples per prompt, from the train split; 0 = "
                       "zero-shot")
  flags.DEFINE_integer("seed", 0, "seed of the in-context examples and --max_examples subset")
  flags.DEFINE_string("template", DEFAULT_TEMPLATE.replace("\n", "\\n"), "one example: "
                      "{text} then {label} (last); \\n and \\t are newline and tab")
  flags.DEFINE_string("separator", DEFAULT_SEPARATOR.replace("\n", "\\n"), "between examples "
                      "(\\n = newline)")
  flags.DEFINE_string("verbalizer", None, "label words: label=words,label=words or a JSON file "
                      "{label: words}; default the label names")
  flags.DEFINE_enum("scoring", "sum", list(SCORINGS), "candidate score: summed log-probability "
                    "or its per-token mean")
  flags.DEFINE_integer("max_len", None, "context in tokens (default the model's n_positions); "
                       "longer prompts lose their oldest tokens")
  flags.DEFINE_integer("batch_size", 16, "(prompt, label) rows per jitted call")
  flags.DEFINE_boolean("bos", True, "start each prompt with the EOS token, as jaxft "
                       "pretraining documents start")
  flags.DEFINE_string("output", None, "write the report, settings and per-example scores here "
                      "(JSON)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  options = Options(k=f.k, seed=f.seed, template=unescape(f.template),
                    separator=unescape(f.separator), scoring=f.scoring, max_len=f.max_len,
                    batch_size=f.batch_size, bos=f.bos)
  with cli.user_errors("prompt_eval"):  # a setting or file to fix: the message, no traceback
    run(workdir=f.workdir, init_from=f.init_from, step=f.step, split=f.split,
        max_examples=f.max_examples, labels=f.labels, verbalizer=f.verbalizer, output=f.output,
        options=options, dataset=f.dataset, train=f.train, validation=f.validation, test=f.test,
        text_field=f.text_field, label_field=f.label_field,
        validation_fraction=f.validation_fraction, test_fraction=f.test_fraction,
        split_seed=f.split_seed, data_dir=f.data_dir, encoding=f.encoding,
        encoding_errors=f.encoding_errors)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
