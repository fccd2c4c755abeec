"""The frontend's metric set: log-spaced buckets, the sanitised prefix, scrape-time families."""

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from dynamo_llm.metrics import Family, Metrics, log_buckets, sanitize_prefix


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 512, 10), [0, 2, 4, 8, 16, 32, 64, 130, 260, 510]),
        ((50, 128000, 12), [0, 100, 210, 430, 870, 1800, 3600, 7400, 15000, 31000, 63000, 130000]),
        ((50, 32000, 10), [0, 100, 210, 430, 880, 1800, 3700, 7600, 16000, 32000]),
        (
            (0.001, 480, 18),
            [
                0,
                0.0022,
                0.0047,
                0.01,
                0.022,
                0.047,
                0.1,
                0.22,
                0.47,
                1,
                2.2,
                4.7,
                10,
                22,
                48,
                100,
                220,
                480,
            ],
        ),
        (
            (0.001, 2, 13),
            [0, 0.0019, 0.0035, 0.0067, 0.013, 0.024, 0.045, 0.084, 0.16, 0.3, 0.56, 1.1, 2.0],
        ),
    ],
)
def test_log_buckets_match_the_spec(args: tuple[float, float, int], expected: list[float]) -> None:
    assert log_buckets(*args) == pytest.approx(expected)


def test_metrics_prefix_is_sanitised() -> None:
    assert sanitize_prefix("nv-llm/http service") == "nv_llm_http_service"
    assert sanitize_prefix(None) == "dynamo_frontend"
    assert sanitize_prefix("___") == "dynamo_frontend"
    assert sanitize_prefix("9lives") == "_9lives"


class _Constant(Family):
    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        family.add_metric(["a"], 3.0)
        return family


def test_a_scrape_time_family_is_exposed_once_added() -> None:
    metrics = Metrics()
    metrics.add_family(_Constant("constant", "A constant", ("model",)))
    assert 'constant{model="a"} 3.0' in generate_latest(metrics.registry).decode()
