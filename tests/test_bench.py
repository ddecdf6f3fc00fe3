"""`python -m jaxft.bench`: the figures it prints and its final JSON line."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_bench_cli_ends_with_one_json_line_of_consistent_figures():
  out = subprocess.run(
      [sys.executable, "-m", "jaxft.bench", "--config", "configs/gpt2.py:tiny", "--steps", "2",
       "--rounds", "2", "--warmup", "1", "--torch", "eager", "--config.mesh.data=1",
       "--config.batch_size=4"],
      cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  r = json.loads(lines[-1])
  assert r["variant"] == "tiny" and r["batch_size"] == 4 and r["seq_len"] == 32
  assert r["compile_s"] > 0 and len(r["step_s_rounds"]) == 2
  assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_s"])
  assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 140e9)
  assert r["temp_bytes"] > 0 and r["host_peak_rss_bytes"] > 0
  assert r["jaxft_over_torch"] == pytest.approx(r["torch_eager_step_s"] / r["step_s"])
  assert any("tokens/s" in line and "MFU" in line for line in lines)
