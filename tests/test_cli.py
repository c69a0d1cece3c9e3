"""The ``ds-distil`` command itself: help, version, and that --help stays instant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_distil import __version__
from ds_distil.cli import SUBCOMMANDS

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "ds-distil"


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(list(argv), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "ds_distil"], [str(CONSOLE_SCRIPT)]],
                         ids=["python -m ds_distil", "console script"])
def test_help_lists_every_subcommand(command):
    proc = _run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ds-distil")
    flat = " ".join(proc.stdout.split())  # argparse wraps long help lines
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    for name, _module, help_text in SUBCOMMANDS:
        assert name in listed, (name, listed)
        assert " ".join(help_text.split()) in flat, name
    assert "init-student" in listed


@pytest.mark.parametrize("command", [[sys.executable, "-m", "ds_distil"], [str(CONSOLE_SCRIPT)]],
                         ids=["python -m ds_distil", "console script"])
def test_version_prints_the_package_version(command):
    proc = _run(*command, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ds-distil {__version__}"


def test_no_subcommand_prints_help_and_fails():
    proc = _run(sys.executable, "-m", "ds_distil")
    assert proc.returncode == 2
    assert "usage: ds-distil" in proc.stdout


def test_init_student_help_shows_its_options():
    proc = _run(sys.executable, "-m", "ds_distil", "init-student", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--teacher", "--output", "--layers", "--num-layers", "--no-fold-token-type",
                   "--random-head-transform", "--force"):
        assert option in proc.stdout, option


def test_help_does_not_import_the_heavy_libraries():
    """Subcommand modules import torch & co. inside functions, so --help answers at once."""
    probe = ("import sys\n"
             "from ds_distil.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    proc = _run(sys.executable, "-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
