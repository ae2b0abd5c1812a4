"""The HTTP API teacher against a real local server that can be told to fail."""

from __future__ import annotations

import time

import pytest

from fake_openai import free_port, serve
from kdistill.config import TeacherApiConfig
from kdistill.errors import KDistillError
from kdistill.teachers.api import ApiError, ApiTeacher, Job, parse_retry_after

KEY = "sk-test-SECRET-4b1d9e"


@pytest.fixture()
def server(monkeypatch):
    yield from serve(monkeypatch, KEY, "KD_TEST_KEY")


def api(server, **kw) -> ApiTeacher:
    base = dict(base_url=server.base_url if server else f"http://127.0.0.1:{free_port()}/v1", model="teacher-x",
                api_key_env="KD_TEST_KEY", max_concurrency=4, timeout=30, max_retries=3, backoff_base=0.01,
                backoff_max=0.05)
    base.update(kw)
    return ApiTeacher(TeacherApiConfig(**base))


def jobs(*prompts):
    return [Job(p, [{"role": "user", "content": p}], 0.0, 16) for p in prompts]


def test_success_and_concurrency_overlaps(server):
    server.delay = 0.1
    t = api(server, max_concurrency=4)
    out = t.complete_many(jobs(*[f"q{i}" for i in range(16)]))
    assert [c.text for c in out] == [f"echo: q{i}" for i in range(16)]
    assert all(c.finish_reason == "stop" for c in out)
    assert 2 <= server.max_in_flight <= 4  # requests really overlapped, never more than max_concurrency
    assert t.summary()["retries"] == 0


def test_retries_500_and_429_with_retry_after(server):
    server.plan = {"a": ["500", "503"], "b": ["429"]}
    server.retry_after = "1"
    t = api(server)
    out = t.complete_many(jobs("a", "b"))
    assert [c.text for c in out] == ["echo: a", "echo: b"]
    assert out[0].attempts == 3 and out[1].attempts == 2
    assert t.summary()["retries"] == 3
    b_times = [r["t"] for r in server.requests if r["prompt"] == "b"]
    assert b_times[1] - b_times[0] >= 0.9  # waited as Retry-After said, not the tiny backoff


def test_timeout_malformed_and_empty_are_retried(server):
    server.plan = {"slow": ["timeout"], "bad": ["malformed", "nochoices"], "blank": ["empty"]}
    server.timeout_sleep = 6.0
    t = api(server, timeout=2.0)
    out = t.complete_many(jobs("slow", "bad", "blank"))
    assert [c.text for c in out] == ["echo: slow", "echo: bad", "echo: blank"]
    assert [c.attempts for c in out] == [2, 3, 2]


def test_always_empty_is_a_failure_not_an_answer(server):
    server.plan = {"x": ["empty"] * 10, "y": ["400"]}
    t = api(server, max_retries=2)
    x, y, z = t.complete_many(jobs("x", "y", "z"))
    assert x.text is None and x.error == "empty response" and x.attempts == 3
    assert y.text is None and y.error.startswith("HTTP 400") and y.attempts == 1  # not retried
    assert z.text == "echo: z"


def test_wrong_key_fails_at_once(server, monkeypatch):
    monkeypatch.setenv("KD_TEST_KEY", "sk-wrong-key-123")
    t = api(server, max_retries=6, backoff_base=30, backoff_max=60)
    t0 = time.time()
    with pytest.raises(ApiError) as err:
        t.complete_many(jobs(*[f"q{i}" for i in range(20)]))
    assert time.time() - t0 < 15  # a single retry would have slept >= 15 s
    msg = str(err.value)
    assert "401" in msg and "KD_TEST_KEY" in msg and "sk-wrong-key-123" not in msg
    assert len(server.requests) == 0  # refused before a single prompt was served
    assert isinstance(err.value, KDistillError)


def test_unknown_model_fails_at_once(server):
    t = api(server, model="no-such-model", max_retries=6, backoff_base=30, backoff_max=60)
    with pytest.raises(ApiError, match="404.*no-such-model"):
        t.complete_many(jobs("a", "b", "c"))


def test_unreachable_fails_at_once(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    t = api(None, api_key_env=None, max_retries=6, backoff_base=30, backoff_max=60)
    t0 = time.time()
    with pytest.raises(ApiError, match="cannot reach"):
        t.complete_many(jobs("a", "b"))
    assert time.time() - t0 < 15  # a single retry would have slept >= 15 s


def test_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("KD_NOPE", raising=False)
    with pytest.raises(KDistillError, match="KD_NOPE is not set"):
        ApiTeacher(TeacherApiConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="KD_NOPE"))


def test_key_not_in_repr(server):
    t = api(server)
    assert KEY not in repr(t) and KEY not in str(vars(t).get("cfg"))


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
