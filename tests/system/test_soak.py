"""The CI variant of ``bench/soak.py``: 20 seconds, a worker killed every 5 s, migration off and
on.

Expected: the script's own invariants hold (gauges 0, ``requests_total`` == requests sent, no
``internal``, every completed text exactly the fault-free one) and it returns 0.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "migration_limit",
    ["0", "1"],
)
def test_a_20_second_soak_keeps_every_invariant(
    migration_limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    soak = load_soak()
    code = soak.main(
        ["--duration", "20", "--kill-every", "5", "--migration-limit", migration_limit]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "soak: passed" in out
