"""The command line: flags, environment variables and defaults, parsed in process through
:func:`dynamo_llm.cli.parse_config`.

The commands as they run (a server, child processes) are in ``tests/system/test_cli.py``.
"""

from __future__ import annotations

import pytest

from dynamo_llm.cli import build_parser, parse_config
from dynamo_llm.config import Config
from dynamo_llm.engines.factory import mocker_config
from dynamo_llm.engines.mocker import MockerConfig

ENGINE_FLAGS = [
    "--engine",
    "--model-name",
    "--context-length",
    "--num-gpu-blocks-override",
    "--block-size",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--speedup-ratio",
    "--decode-speedup-ratio",
    "--tokenizer",
    "--seed",
    "--token-echo-delay-ms",
]
HTTP_FLAGS = [
    "--http-host",
    "--http-port",
    "--http-interface",
    "--body-limit-mb",
    "--graceful-shutdown-timeout-secs",
    "--backend-stream-timeout-secs",
    "--first-token-timeout-secs",
    "--request-timeout-secs",
    "--metrics-prefix",
    "--log-level",
]
MOCKER_ENV = {
    "DYN_ENGINE": "mocker",
    "DYN_MODEL_NAME": "from-env",
    "DYN_CONTEXT_LENGTH": "4096",
    "DYN_MOCKER_NUM_GPU_BLOCKS": "512",
    "DYN_MOCKER_BLOCK_SIZE": "16",
    "DYN_MOCKER_MAX_NUM_SEQS": "32",
    "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS": "2048",
    "DYN_MOCKER_ENABLE_PREFIX_CACHING": "0",
    "DYN_MOCKER_SPEEDUP_RATIO": "50",
    "DYN_MOCKER_DECODE_SPEEDUP_RATIO": "2",
    "DYN_TOKENIZER": "/models/tokenizer.json",
    "DYN_MOCKER_SEED": "7",
}


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser(Config()).parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_help_lists_every_flag_with_its_environment_variable(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    for flag in ENGINE_FLAGS + HTTP_FLAGS:
        assert flag in text, flag
    flat = " ".join(text.split())  # argparse wraps lines, sometimes inside a name
    for var in MOCKER_ENV:
        assert var in flat.replace("- ", "-"), var
    assert "default mocker" in flat


ROUTER_FLAGS = {
    "--upstream",
    "--upstream-api-key",
    "--upstream-file",
    "--router-mode",
    "--max-inflight-per-worker",
    "--router-kv-overlap-score-weight",
    "--router-temperature",
    "--worker-connect-timeout-secs",
    "--worker-max-connections",
    "--worker-probe-timeout-secs",
    "--migration-limit",
    "--worker-idle-probe-interval-secs",
    "--worker-metrics-interval-secs",
}
# What only a worker that registers itself in etcd needs.
REGISTRATION_FLAGS = {"--discovery-lease-ttl-secs", "--advertise-url"}
# What only a worker publishing its mocker's KV cache events needs.
KV_EVENT_FLAGS = {"--kv-events-port", "--kv-events-replay-port"}
SERVE_ONLY = {
    *ROUTER_FLAGS,
    # A worker's stop route must reach the process holding the request: one process only.
    "--num-workers",
}


def test_serve_and_worker_take_the_same_flags_but_only_serve_routes() -> None:
    parser = build_parser(Config())
    subparsers = next(a for a in parser._actions if a.dest == "command")
    choices = subparsers.choices
    assert isinstance(choices, dict)  # a subparsers action's choices: name -> parser
    serve = {s for a in choices["serve"]._actions for s in a.option_strings}
    worker = {s for a in choices["worker"]._actions for s in a.option_strings}
    assert serve - SERVE_ONLY == worker - REGISTRATION_FLAGS - KV_EVENT_FLAGS
    assert serve >= SERVE_ONLY
    assert worker >= REGISTRATION_FLAGS | KV_EVENT_FLAGS


def test_router_flags_and_environment_feed_the_config() -> None:
    _, config = parse_config(
        ["serve", "--upstream", "http://a:1", "--upstream", "b:2", "--router-mode", "kv"],
        {"DYN_MAX_INFLIGHT_PER_WORKER": "7", "DYN_ROUTER_TEMPERATURE": "0.5"},
    )
    assert config.routed
    assert config.upstreams == ("http://a:1", "b:2")
    assert config.router_mode == "kv"
    assert config.max_inflight_per_worker == 7
    assert config.router_temperature == 0.5
    _, from_env = parse_config(["serve"], {"DYN_UPSTREAMS": "http://x:1, http://y:2"})
    assert from_env.upstreams == ("http://x:1", "http://y:2")
    _, plain = parse_config(["serve"], {})
    assert not plain.routed


def test_without_flags_or_environment_serve_runs_the_mocker_with_dynamo_defaults() -> None:
    command, config = parse_config(["serve"], {})
    assert command == "serve"
    assert config.engine == "mocker"
    assert config.model_name is None
    assert mocker_config(config) == MockerConfig()
    assert mocker_config(config) == MockerConfig(
        num_gpu_blocks=16384,
        block_size=64,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        enable_prefix_caching=True,
        speedup_ratio=1.0,
        decode_speedup_ratio=1.0,
        context_length=8192,
        seed=0,
        tokenizer=None,
    )


def test_environment_variables_feed_the_config() -> None:
    _, config = parse_config(["worker"], MOCKER_ENV)
    assert config.model_name == "from-env"
    assert mocker_config(config) == MockerConfig(
        num_gpu_blocks=512,
        block_size=16,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        speedup_ratio=50.0,
        decode_speedup_ratio=2.0,
        context_length=4096,
        seed=7,
        tokenizer="/models/tokenizer.json",
    )


def test_flags_win_over_environment_variables() -> None:
    argv = [
        "worker",
        "--engine=echo",
        "--model-name=from-flag",
        "--context-length=1000",
        "--num-gpu-blocks-override=64",
        "--block-size=8",
        "--max-num-seqs=4",
        "--max-num-batched-tokens=128",
        "--enable-prefix-caching",
        "--speedup-ratio=1000",
        "--decode-speedup-ratio=3",
        "--tokenizer=/other/tokenizer.json",
        "--seed=11",
        "--http-port=0",
    ]
    _, config = parse_config(argv, {**MOCKER_ENV, "DYN_HTTP_PORT": "9001"})
    assert config.engine == "echo"
    assert config.model_name == "from-flag"
    assert config.http_port == 0
    assert mocker_config(config) == MockerConfig(
        num_gpu_blocks=64,
        block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=128,
        enable_prefix_caching=True,
        speedup_ratio=1000.0,
        decode_speedup_ratio=3.0,
        context_length=1000,
        seed=11,
        tokenizer="/other/tokenizer.json",
    )
    _, config = parse_config(["serve", "--no-enable-prefix-caching"], {})
    assert config.mocker_enable_prefix_caching is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False), ("maybe", True)],
)
def test_boolean_environment_values(value: str, expected: bool) -> None:
    config = Config.from_env({"DYN_MOCKER_ENABLE_PREFIX_CACHING": value})
    assert config.mocker_enable_prefix_caching is expected


def test_unparsable_numbers_in_the_environment_fall_back_to_the_defaults() -> None:
    config = Config.from_env({"DYN_MOCKER_SPEEDUP_RATIO": "fast", "DYN_MOCKER_BLOCK_SIZE": "x"})
    assert config.mocker_speedup_ratio == 1.0
    assert config.mocker_block_size == 64


def test_dyn_http_port_zero_means_any_free_port() -> None:
    assert Config.from_env({"DYN_HTTP_PORT": "0"}).http_port == 0
    assert Config.from_env({}).http_port == 8000
