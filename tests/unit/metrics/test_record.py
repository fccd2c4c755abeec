"""The metrics package's seams: a leaf, the outcome labels on the wire, the public families."""

import ast
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

import dynamo_llm.metrics
from dynamo_llm import errors
from dynamo_llm.metrics import Family, Metrics, Outcome
from dynamo_llm.runtime import FakeClock

# SPEC §5: the requests_total{error_type} values, and which one means success.
SPEC_ERROR_TYPES = {
    "",
    "validation",
    "not_found",
    "overload",
    "unavailable",
    "cancelled",
    "response_timeout",
    "not_implemented",
    "internal",
}


def test_metrics_package_imports_no_other_dynamo_llm_module() -> None:
    package = Path(dynamo_llm.metrics.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (path.name, node.module)
                assert not (node.module or "").startswith("dynamo_llm"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dynamo_llm") for a in node.names), path.name


def test_outcome_values_are_the_spec_error_type_labels() -> None:
    assert {o.value for o in Outcome} == SPEC_ERROR_TYPES
    assert Outcome.SUCCESS.status == "success"
    assert {o.status for o in Outcome if o is not Outcome.SUCCESS} == {"error"}
    # Still equal to the label string (mypy does not model a StrEnum member's str equality).
    assert Outcome.CANCELLED == "cancelled"  # type: ignore[comparison-overlap]


def test_every_error_class_carries_an_outcome() -> None:
    classes = [errors.DynamoError]
    while classes:
        cls = classes.pop()
        assert isinstance(cls.error_type, Outcome), cls.__name__
        assert cls.error_type is not Outcome.SUCCESS, cls.__name__
        classes += cls.__subclasses__()


def test_mark_error_takes_an_outcome_or_its_label_string() -> None:
    metrics = Metrics()
    for outcome in (Outcome.OVERLOAD, "overload"):
        record = metrics.begin("completions", FakeClock())
        record.mark_error(outcome)
        assert record.outcome is Outcome.OVERLOAD
        record.release()
    key = ("unknown_model", "completions", "unary", "error", "overload")
    assert metrics.requests_total.children[key].value == 2
    (stored,) = metrics.requests_total.children  # plain strings, as the exposition expects
    assert all(type(v) is str for v in stored)


class _Constant(Family):
    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        family.add_metric(["a"], 3.0)
        return family


def test_a_scrape_time_family_is_exposed_once_added() -> None:
    metrics = Metrics()
    metrics.add_family(_Constant("constant", "A constant", ("model",)))
    assert 'constant{model="a"} 3.0' in generate_latest(metrics.registry).decode()
