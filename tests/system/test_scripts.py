"""``scripts/serve`` and ``scripts/test`` on a ``.venv`` that cannot be used (issue 10, problem
11): they say why and rebuild it, instead of failing on it again and again. Run on a copy of
``scripts/`` in a scratch checkout, with ``PYTHON`` a stand-in that refuses to build the new
venv, so nothing is installed: what is checked is the diagnosis and the removal."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    "python, why",
    [
        (None, "it has no runnable bin/python"),
        ("#!/bin/sh\nexit 3\n", "its Python does not run or is older than 3.11"),
        ("#!/bin/sh\necho /somewhere/else\n", "it belongs to another location (/somewhere/else)"),
    ],
    ids=["no-python", "broken-python", "foreign"],
)
def test_an_unusable_venv_is_named_and_rebuilt(
    python: str | None, why: str, tmp_path: Path
) -> None:
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    venv = tmp_path / ".venv"
    venv.mkdir()
    if python is not None:
        _executable(venv / "bin" / "python", python)
    refusing = tmp_path / "old-python3"
    _executable(refusing, "#!/bin/sh\nexit 1\n")  # "older than 3.11": nothing gets built
    env = {**os.environ, "PYTHON": str(refusing)}
    run = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "test")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"scripts: {venv} is unusable: {why}; rebuilding it" in run.stderr
    assert not venv.exists()  # removed, to be built afresh
    assert run.returncode == 1
    assert "set PYTHON=/path/to/python3.11+" in run.stderr  # and what to do about the stand-in
