"""The packages' seams: where each sits in the layers, and the transport's public surface."""

import ast
from pathlib import Path

import dynamo_llm
import dynamo_llm.metrics
import dynamo_llm.transport

SRC = Path(dynamo_llm.__file__).parent


def imports_of(package: str) -> set[str]:
    """The dynamo_llm modules that a package's files import, as absolute dotted names."""
    found: set[str] = set()
    for path in (SRC / package).rglob("*.py"):
        parts = ("dynamo_llm", *path.relative_to(SRC).with_suffix("").parts)
        here = parts[:-1]  # the package the file is in
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else ()
                found.add(".".join((*base, *filter(None, [node.module]))))
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("dynamo_llm.")}


def test_transport_imports_neither_the_router_nor_the_http_layer() -> None:
    imported = imports_of("transport")
    assert "dynamo_llm.engines.base" in imported  # the sanity of the walk itself
    above = ("dynamo_llm.router", "dynamo_llm.http", "dynamo_llm.cli", "dynamo_llm.fleet")
    assert not [name for name in imported if name.startswith(above)]


def test_engines_do_not_import_the_transport() -> None:
    assert not [name for name in imports_of("engines") if name.startswith("dynamo_llm.transport")]


def test_the_protocols_that_hold_the_stream_chunk_shape_stay_a_leaf() -> None:
    imported = imports_of("protocols")
    assert "dynamo_llm.protocols.common" in imported
    assert not [
        name
        for name in imported
        if not name.startswith("dynamo_llm.protocols.") and name != "dynamo_llm.errors"
    ]


def test_metrics_package_imports_no_other_dynamo_llm_module() -> None:
    package = Path(dynamo_llm.metrics.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (path.name, node.module)
                assert not (node.module or "").startswith("dynamo_llm"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dynamo_llm") for a in node.names), path.name


def test_transport_exports_its_public_names() -> None:
    assert sorted(dynamo_llm.transport.__all__) == [
        "RemoteStream",
        "WorkerClient",
        "error_from_worker",
        "make_session",
        "upstream_body",
    ]
    for name in dynamo_llm.transport.__all__:
        assert getattr(dynamo_llm.transport, name).__module__.startswith("dynamo_llm.transport.")
