"""`python -m jaxft.bench`: the train-step throughput benchmark (jaxft/bench/throughput.py)."""

from absl import app, flags

from jaxft.bench import throughput

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(throughput.main)
