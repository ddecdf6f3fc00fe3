"""Prompt evaluation: candidate log-likelihoods against transformers' GPT2LMHeadModel (random
init, save_pretrained), demonstration sampling, sum/mean scoring, errors, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from jaxft.data import prompts
from jaxft.inference import prompt_scoring, prompting
from tests.helpers import ROOT

EOS = 50256
# initializer_range 0.2 (HF's default is 0.02) so that the next-token distributions are far
# from uniform and a wrong position or token would show.
HF_SHAPE = dict(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                initializer_range=0.2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE)).eval()
  path = tmp_path_factory.mktemp("hf_gpt2")
  reference.save_pretrained(path)
  return str(path), reference


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return prompting.load_model(init_from=hf_dir[0])


def _torch_logprob(reference, prompt: list[int], candidate: list[int]) -> float:
  with torch.no_grad():
    logits = reference(torch.tensor([prompt + candidate])).logits[0].double()
  logp = torch.log_softmax(logits, dim=-1)
  return sum(logp[len(prompt) - 1 + t, c].item() for t, c in enumerate(candidate))


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_candidate_logprobs_match_transformers_with_padding_and_truncation(hf_dir, loaded):
  _, reference = hf_dir
  model, params, _ = loaded
  rng = np.random.default_rng(0)
  # Rows of lengths 5..84 land in several buckets; the 80-token prompt does not fit 64.
  prompts = [rng.integers(0, 50257, n).tolist() for n in (3, 10, 29, 80)]
  candidates = [[5], [17, 900], [3, 4, 5]]
  scored = prompt_scoring.score_candidates(model, params, prompts, candidates, max_len=64,
                                           batch_size=5, prefix=[EOS])

  assert scored.truncated == 1
  room = 64 - 3  # the longest candidate has 3 tokens
  assert scored.prompts[3] == [EOS, *prompts[3][-(room - 1):]]  # oldest tokens dropped
  assert [p[1:] for p in scored.prompts[:3]] == prompts[:3]
  for i, prompt in enumerate(scored.prompts):
    for j, candidate in enumerate(candidates):
      assert abs(scored.logprobs[i, j] - _torch_logprob(reference, prompt, candidate)) < 1e-4

  alone = prompt_scoring.score_candidates(model, params, prompts, candidates, max_len=64,
                                          batch_size=1, prefix=[EOS])
  np.testing.assert_allclose(alone.logprobs, scored.logprobs, atol=1e-5, rtol=0)
  # A shorter --max_len cuts more and still matches the reference.
  short = prompt_scoring.score_candidates(model, params, prompts[1:2], candidates, max_len=8,
                                          batch_size=4, prefix=[EOS])
  assert short.truncated == 1 and short.prompts[0] == [EOS, *prompts[1][-4:]]
  assert abs(short.logprobs[0, 2] - _torch_logprob(reference, short.prompts[0], [3, 4, 5])) < 1e-4


def test_demonstrations_are_seeded_and_never_the_example_itself():
  a = prompts.sample_demonstrations(10, range(10), k=9, seed=3, same_split=True)
  assert a == prompts.sample_demonstrations(10, range(10), k=9, seed=3, same_split=True)
  for i, picks in enumerate(a):
    assert sorted(picks) == [j for j in range(10) if j != i]  # all others, never itself
  b = prompts.sample_demonstrations(50, range(20), k=4, seed=0, same_split=True)
  assert all(i not in picks and len(set(picks)) == 4 for i, picks in enumerate(b))
  assert b != prompts.sample_demonstrations(50, range(20), k=4, seed=1, same_split=True)
  # An example's demonstrations depend on its index, not on which others are scored.
  assert prompts.sample_demonstrations(50, [7], k=4, seed=0, same_split=True)[0] == b[7]
  # Another split may use the whole train split.
  c = prompts.sample_demonstrations(5, range(3), k=5, seed=0, same_split=False)
  assert all(sorted(picks) == list(range(5)) for picks in c)


def test_prompt_layout_and_verbalizer_continuation():
  template = prompts.Template.parse("Review: {text}\nSentiment: {label}.")
  assert template.gap == " "
  prompt = prompts.build_prompt(template, "\n\n", "fine",
                                [("bad", "negative"), ("good", "positive")])
  assert prompt == ("Review: bad\nSentiment: negative.\n\nReview: good\nSentiment: positive."
                    "\n\nReview: fine\nSentiment:")
  assert prompts.Template.parse("{text}\n{label}").gap == "\n"
  assert prompts.unescape(r"{text}\nLabel:\t{label}\\n") == "{text}\nLabel:\t{label}\\n"


def test_sum_and_mean_scoring(loaded):
  # By hand: "a" (1 token, -2) wins on the sum, "b" (3 tokens, -3 = -1 per token) on the mean.
  logprobs = np.array([[-2.0, -3.0]])
  assert prompt_scoring.candidate_scores(logprobs, [1, 3], "sum").tolist() == [[-2.0, -3.0]]
  assert prompt_scoring.candidate_scores(logprobs, [1, 3], "mean").tolist() == [[-2.0, -1.0]]

  model, params, tok = loaded
  train = [{"text": "the match", "label": "sport"}, {"text": "the vote", "label": "politics"}]
  examples = [{"text": "a goal", "label": "sport"}, {"text": "the bill", "label": "politics"}]
  verbalizer = {"sport": "Sport", "politics": "Parliamentary politics and government"}
  results = {}
  for method in prompt_scoring.SCORINGS:
    results[method] = prompting.classify(model, params, tok, train, examples, ["politics", "sport"],
                                  verbalizer, prompting.Options(k=1, scoring=method))
  counts = results["sum"]["candidate_tokens"]
  assert counts["sport"] == 1 and counts["politics"] > 3
  for method, divide in (("sum", lambda lp, n: lp), ("mean", lambda lp, n: lp / n)):
    for p in results[method]["predictions"]:
      scores = {label: divide(lp, counts[label]) for label, lp in p["logprobs"].items()}
      assert p["prediction"] == max(scores, key=scores.get)
  # Same prompts and candidates: the log-likelihoods do not depend on the scoring.
  assert [p["logprobs"] for p in results["sum"]["predictions"]] == \
         [p["logprobs"] for p in results["mean"]["predictions"]]


def test_errors_name_the_flag_and_fix(tmp_path, loaded):
  model, params, tok = loaded
  labels = ["business", "sport"]
  with pytest.raises(ValueError, match=r"--verbalizer has no words for label\(s\) \['sport'\]"):
    prompts.parse_verbalizer("business=Business", labels)
  with pytest.raises(ValueError, match=r"--verbalizer names label\(s\) \['tech'\] that are not "
                                       "in the dataset"):
    prompts.parse_verbalizer("business=Business,sport=Sport,tech=Tech", labels)
  with pytest.raises(ValueError, match="same words"):
    prompts.parse_verbalizer("business=Sport,sport=Sport", labels)
  (tmp_path / "v.json").write_text(json.dumps({"business": "Money", "sport": "Games"}))
  assert prompts.parse_verbalizer(str(tmp_path / "v.json"), labels) == {"business": "Money",
                                                                    "sport": "Games"}
  with pytest.raises(ValueError, match=r"--k=4 .* the train split has 3 \(less the evaluated "
                                       r"example itself\); lower --k to at most 3"):
    prompts.sample_demonstrations(4, range(4), k=4, seed=0, same_split=True)
  with pytest.raises(ValueError, match=r"--k=5 .* train split has 4; lower --k"):
    prompts.sample_demonstrations(4, range(2), k=5, seed=0, same_split=False)
  with pytest.raises(ValueError, match="the test split holds no examples"):
    prompting.classify(model, params, tok, [{"text": "x", "label": "sport"}], [], labels)
  with pytest.raises(ValueError, match=r"--max_len=128 exceeds the model's n_positions=64"):
    prompting.classify(model, params, tok, [{"text": "x", "label": "sport"}],
                [{"text": "y", "label": "sport"}], labels, options=prompting.Options(max_len=128))
  with pytest.raises(ValueError, match=r"--template=.*needs a \{text\} field and then one "
                                       r"\{label\}"):
    prompts.Template.parse("{text} is it")
  with pytest.raises(ValueError, match="the label must come last"):
    prompts.Template.parse("{label}: {text}")
  with pytest.raises(ValueError, match=r"only \{text\} and \{label\}"):
    prompts.Template.parse("{text} {topic} {label}")

  # Not a causal LM: an HF classifier, a BERT, a fine-tuning run.
  for name, config in (("cls", {"model_type": "gpt2",
                                "architectures": ["GPT2ForSequenceClassification"]}),
                       ("bert", {"model_type": "bert", "architectures": ["BertModel"]})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"--init_from=.* not a causal LM"):
      prompting.load_model(init_from=str(tmp_path / name))
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps({"task": "classification"}))
  with pytest.raises(ValueError, match=r"--workdir=.* trained a classification model.*causal"):
    prompting.load_model(workdir=str(tmp_path / "run"))
  with pytest.raises(ValueError, match="exactly one of --workdir"):
    prompting.load_model()
  # The data loader's messages speak of this CLI's flags.
  with pytest.raises(FileNotFoundError, match=r"^--train='.*missing.jsonl' is not a file"):
    prompting.load_data(prompting.data_config(train=str(tmp_path / "missing.jsonl")))


def test_cli_end_to_end_on_jsonl(tmp_path, hf_dir, loaded):
  path, reference = hf_dir
  texts = {"pos": ["great film", "loved it", "wonderful acting", "a joy"],
           "neg": ["awful film", "hated it", "boring plot", "a mess"]}
  train = [{"text": t, "label": label} for label in texts for t in texts[label][:3]]
  test = [{"text": texts[label][3], "label": label} for label in texts]
  _write_jsonl(tmp_path / "train.jsonl", train)
  _write_jsonl(tmp_path / "test.jsonl", test)
  args = ["--init_from", path, "--train", str(tmp_path / "train.jsonl"), "--test",
          str(tmp_path / "test.jsonl"), "--data_dir", str(tmp_path / "tfds"),
          "--verbalizer", "pos=positive,neg=negative", "--template", r"{text}\nSentiment: {label}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "jaxft.prompt_eval", *args, "--k", "2",
                        "--output", str(tmp_path / "k2.json")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "accuracy" in out.stdout and "chance 1/2 = 0.5000" in out.stdout
  result = json.loads((tmp_path / "k2.json").read_text())
  assert result["k"] == 2 and result["examples"] == 2 and result["chance"] == 0.5
  assert set(result["report"]["per_class"]) == {"neg", "pos"}
  assert result["accuracy"] == np.mean([p["label"] == p["prediction"]
                                        for p in result["predictions"]])

  # The same data through run(): zero-shot, and its numbers are the reference model's.
  result = prompting.run(init_from=path, train=str(tmp_path / "train.jsonl"),
                  test=str(tmp_path / "test.jsonl"), data_dir=str(tmp_path / "tfds"),
                  verbalizer="pos=positive,neg=negative")
  _, _, tok = loaded
  for p, example in zip(result["predictions"], test):
    prompt = [EOS, *tok.encode(example["text"] + "\nLabel:")]
    for label, words in (("pos", " positive"), ("neg", " negative")):
      want = _torch_logprob(reference, prompt, tok.encode(words))
      assert abs(p["logprobs"][label] - want) < 1e-4


def test_truncated_prompts_are_counted_and_logged(loaded, caplog):
  model, params, tok = loaded
  train = [{"text": "word " * 60, "label": "a"}, {"text": "short", "label": "b"}]
  examples = [{"text": "one", "label": "a"}, {"text": "two " * 80, "label": "b"}]
  with caplog.at_level("WARNING", logger="jaxft"):
    result = prompting.classify(model, params, tok, train, examples, ["a", "b"],
                                options=prompting.Options())
  assert result["truncated_prompts"] == 1
  assert "1 of 2 prompts were longer than the 64-token context" in caplog.text
  assert "shorten --template or the texts" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="jaxft"):
    result = prompting.classify(model, params, tok, train, examples, ["a", "b"],
                                options=prompting.Options(k=2))
  assert result["truncated_prompts"] == 2 and "lower --k" in caplog.text
