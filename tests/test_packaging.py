"""What a fresh install needs: the README's commands, CI calling them, the rule sets inside the wheel."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_demo_then_test_command() -> None:
    demo, tests = readme_commands()[:2]
    assert "tools/demo.py" in demo and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_wheel_ships_the_rule_sets(tmp_path: Path) -> None:
    hatchling = pytest.importorskip("hatchling")
    del hatchling
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    wheel = next(tmp_path.glob("onnxq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("onnxq/_patterns/")}
    assert {p.name for p in (ROOT / "patterns").glob("*.toml")} <= shipped
    assert "onnxq/cli.py" in names


def test_every_cli_option_is_in_the_readme() -> None:
    """A flag the CLI offers and the README never names is a flag nobody finds."""
    from onnxq.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    missing = sorted(
        {
            option
            for command in [parser, *subcommands.values()]
            for action in command._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help" and option not in readme
        }
    )
    assert not missing, f"README does not mention {missing}"
