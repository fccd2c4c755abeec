"""Which worker's own key a request carries: the longest base URL the request is under."""

import pytest

from dynamo_llm.transport.auth import WorkerKeys


def test_a_request_carries_the_key_of_the_worker_it_goes_to() -> None:
    keys = WorkerKeys({"http://10.0.0.1:8000": "k1", "http://Proxy:80/team-a/": "ka"})
    assert keys.key_for("http://10.0.0.1:8000/v1/chat/completions") == "k1"
    assert keys.key_for("http://10.0.0.1:8000") == "k1"
    assert keys.key_for("http://10.0.0.1:80001/v1/models") is None  # another port
    assert keys.key_for("http://10.0.0.2:8000/v1/models") is None
    assert keys.key_for("http://proxy/team-a/v1/models") == "ka"  # spelled as aiohttp spells it
    assert keys.key_for("http://proxy/team-ab/v1/models") is None


def test_the_longest_base_url_wins_and_a_replaced_table_forgets_the_old_keys() -> None:
    keys = WorkerKeys({"http://h": "host", "http://h/deep": "deep"})
    assert keys.key_for("http://h/deep/v1/models") == "deep"
    assert keys.key_for("http://h/v1/models") == "host"
    keys.replace({"http://h/deep": "deep-2"})
    assert keys.key_for("http://h/v1/models") is None
    assert keys.key_for("http://h/deep/v1/models") == "deep-2"
    assert "deep-2" not in repr(keys)


def test_a_urls_key_is_looked_up_once_until_the_table_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = WorkerKeys({"http://h:1": "k1", "http://h:2": "k2"})
    lookups: list[str] = []
    lookup = WorkerKeys._lookup

    def counted(self: WorkerKeys, url: str) -> str | None:
        lookups.append(url)
        return lookup(self, url)

    monkeypatch.setattr(WorkerKeys, "_lookup", counted)
    for _ in range(3):
        assert keys.key_for("http://h:1/v1/chat/completions") == "k1"
        assert keys.key_for("http://h:3/v1/chat/completions") is None
    assert len(lookups) == 2
    keys.replace({"http://h:1": "k1-new"})
    assert keys.key_for("http://h:1/v1/chat/completions") == "k1-new"
    assert len(lookups) == 3
