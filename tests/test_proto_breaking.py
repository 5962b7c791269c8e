"""scripts/proto-breaking (in `make lint`): protos that only add pass, protos that remove fail,
whether the change is committed or still in the work tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness import ROOT

BUF = ROOT / "node_modules/.bin/buf"
TOKEN_PROTO = Path("protos/blumpo/token/v1/token.proto")
FIELD = "    string email = 2;\n"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BUF.exists(), reason="buf is not installed: `make lint` installs it (npm ci)"),
]


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True, capture_output=True
    )


def breaking(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(repo / "scripts/proto-breaking")], cwd=repo, capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository of the protos, buf's settings and the script, with one commit."""
    for name in ("protos", "third_party"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/proto-breaking", tmp_path / "scripts/proto-breaking")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    (tmp_path / ".gitignore").write_text("/node_modules\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "protos")
    return tmp_path


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / TOKEN_PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_additions_pass_and_removals_fail(repo: Path) -> None:
    first = breaking(repo)
    assert first.returncode == 0 and "no earlier protos" in first.stderr, first.stderr

    edit(repo, FIELD, FIELD + "    string phone = 3;\n")
    assert breaking(repo).returncode == 0  # in the work tree, against HEAD
    git(repo, "commit", "-qam", "add a field")
    added = breaking(repo)
    assert added.returncode == 0 and "keeps everything" in added.stderr, added.stderr  # against its parent

    edit(repo, FIELD, "")
    uncommitted = breaking(repo)
    assert uncommitted.returncode != 0 and '"email"' in uncommitted.stdout, uncommitted.stdout
    git(repo, "commit", "-qam", "remove a field")
    committed = breaking(repo)
    assert committed.returncode != 0 and '"email"' in committed.stdout, committed.stdout
