"""`make help` describes every target the Makefile declares, one line each."""

from __future__ import annotations

import subprocess

from harness import ROOT


def test_make_help_has_one_line_for_each_declared_target() -> None:
    phony = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith(".PHONY:"))
    declared = sorted(phony.removeprefix(".PHONY:").split())
    shown = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    described = {line.split()[1]: line.split(maxsplit=2)[2] for line in shown if line.strip()}
    assert sorted(described) == declared
    assert len(shown) == len(declared)
    assert all(len(text) > 10 for text in described.values())
