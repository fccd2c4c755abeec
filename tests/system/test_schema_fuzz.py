"""An outside schema fuzzer against a real ``serve`` (issue 10, problem 9): schemathesis reads our
``/openapi.json`` and sends what it allows and what it forbids. Nothing answers 5xx (but the
documented 501 for ``functions``), no schema-valid request is refused and no schema-invalid one
accepted, and every answer matches its documented schema. The configuration
(``tests/system/schemathesis.toml``: fixed seed, derandomized, bounded examples) is the one the
README's command uses; the mocker runs with a small context window so that no generation is long.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn

pytest.importorskip(
    "schemathesis", reason="schemathesis is in the dev extra: pip install -e .[dev]"
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "system" / "schemathesis.toml"
SERVE = [
    "serve",
    "--engine",
    "mocker",
    "--speedup-ratio",
    "1000",
    "--context-length",
    "128",
    "--http-port",
    "0",
    "--log-level",
    "warning",
]


def test_schemathesis_finds_nothing_our_openapi_document_and_the_server_disagree_on(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    with ServerProcess(SERVE, env=environ_without_dyn()) as frontend:
        base = frontend.wait_ready(timeout=30)
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--no-color",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    assert frontend.returncode == 0, frontend.log
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    print(f"schemathesis: {cases}, valid rates {result['valid_rates']}")
    assert result["complete"] and result["stop_reason"] == "completed"
    assert result["operations"]["tested"] == result["operations"]["total"] == 7
    assert cases["unique_failures"] == cases["errored"] == 0
    assert result["failures"] == result["errors"] == []
    # Schema-valid requests reached both endpoints' engine and were answered.
    rates = result["valid_rates"]
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert sum(phase["accepted"] for phase in rates[op].values()) >= 10, rates[op]
    assert not any(result["warnings"].values()), result["warnings"]
