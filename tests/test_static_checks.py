"""Static checks, on every test run: the layers point one way (app > generation > ingestion > retrieval) and the
stages never import the web framework (import-linter's contracts in pyproject.toml); ruff finds nothing; mypy
(strict, on ingestion, retrieval and generation: [tool.mypy] in pyproject.toml) finds nothing."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name(name)), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_import_contracts_hold():
    result = run_tool("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_strict_finds_nothing(tmp_path):
    # plain `mypy` checks what pyproject.toml names; the cache goes to a tmp folder, nothing into the repo
    result = run_tool("mypy", "--cache-dir", str(tmp_path / "mypy-cache"), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
