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


def _module_graph() -> dict[str, set[str]]:
    """Each dynamo_llm module and the dynamo_llm modules it imports when it is imported
    (module-level statements; ``if TYPE_CHECKING:`` blocks do not run, so they do not count)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in SRC.rglob("*.py"):
        parts = ("dynamo_llm", *path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: list[str | None] = []
        statements = list(ast.parse(path.read_text()).body)
        while statements:
            node = statements.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.If | ast.Try):
                statements.extend(node.body)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([module] if module else [])])
                if module.startswith("dynamo_llm"):
                    for alias in node.names:
                        sub = f"{module}.{alias.name}"
                        targets.append(sub if sub in modules else resolve(module))
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("dynamo_llm")]
                targets.extend(resolve(n) for n in names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def test_no_module_imports_itself_through_others() -> None:
    graph = _module_graph()
    assert graph.get("dynamo_llm.http.app")  # the walk works

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    cycles = sorted(name for name in graph if name in reaches(name))
    assert cycles == []


def test_the_layers_below_http_never_import_it() -> None:
    above = ("dynamo_llm.http", "dynamo_llm.cli", "dynamo_llm.fleet", "dynamo_llm.worker")
    for package in ("engines", "router", "transport", "discovery", "runtime", "protocols"):
        imported = imports_of(package)
        assert not [name for name in imported if name.startswith(above)], package
