"""The documentation: the MkDocs site under docs/ builds with --strict (every page in the nav,
no broken link or anchor), and README.md stays the short front door whose set-up block is what
.ci/run runs."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 260


def _readme() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def _first_bash_block(text: str) -> list[str]:
  m = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
  assert m, "README.md has no ```bash block"
  return [line for line in m.group(1).splitlines() if line.strip()]


def test_mkdocs_build_strict(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
  assert (tmp_path / "site" / "index.html").exists()


def test_readme_is_short():
  n = len(_readme().splitlines())
  assert n <= MAX_README_LINES, (f"README.md has {n} lines (at most {MAX_README_LINES}): move "
                                 "guide material to docs/ and link it")


def test_readme_setup_block_is_what_ci_runs():
  lines = _first_bash_block(_readme())
  assert len(lines) == 2, f"README's first ```bash block must be the two set-up commands: {lines}"
  assert "python -m jaxft.train" in lines[0], lines[0]
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = [line.strip() for line in f if "pip install" in line and "pytest" in line]
  assert len(ci) == 1, f".ci/run should have one pip install ... pytest line, found {ci}"
  assert lines[1] == ci[0], f"README's test command\n  {lines[1]}\nis not .ci/run's\n  {ci[0]}"


def test_readme_relative_links_exist():
  text = re.sub(r"^```.*?^```", "", _readme(), flags=re.S | re.M)  # links in code do not count
  targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
  assert targets, "README.md links no guide"
  missing = []
  for target in targets:
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # https:, mailto:, an anchor of README itself
    path = target.split("#", 1)[0]
    if not os.path.exists(os.path.join(ROOT, path)):
      missing.append(target)
  assert not missing, f"README.md links to files that do not exist: {missing}"
