"""The client for a teacher behind an OpenAI-compatible endpoint (chat completions, completions).

Hosted providers, vLLM, SGLang, llama.cpp and Ollama servers all speak
``POST {base_url}/chat/completions``. :class:`ApiTeacher` sends many requests concurrently
(at most ``max_concurrency`` in flight) and is careful with money and time:

* 429, 5xx, connection errors and timeouts are retried with exponential backoff and jitter
  (``backoff_base · 2^attempt``, capped at ``backoff_max``, times a random factor in [0.5, 1.5));
  a ``Retry-After`` header (seconds or an HTTP date) is honoured instead when present;
* a malformed answer (not JSON, no ``choices``) or an empty one is retried too, and after
  ``max_retries`` it is returned as a *failure* (``Completion.text is None``), never as an answer;
* other 4xx (e.g. 400 prompt too long) fail that prompt at once, without retries;
* a wrong key (401/403), an unknown model or path (404), or an endpoint that cannot be reached
  on the first request raise :class:`ApiError` right away: the whole job stops instead of
  retrying for hours. If the endpoint goes away mid-job, a run of consecutive prompts that all
  exhausted their retries on connection errors stops the job the same way.

The API key is read from the environment variable named by ``api_key_env``; it is only ever put
in the ``Authorization`` header, never logged, never in an error message (server messages are
redacted), never in ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from kdistill.errors import ConfigError, KDistillError

log = logging.getLogger("kdistill")


class ApiError(KDistillError):
    """The endpoint cannot serve this job at all (wrong key, unknown model, unreachable)."""


@dataclass
class Completion:
    """One chat completion: ``text`` and ``finish_reason``, or ``text=None`` and ``error``."""

    text: Optional[str]
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    attempts: int = 1
    value: Any = None  # what a non-chat request parsed (e.g. prompt log-probs)

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass
class Job:
    """One request: ``key`` identifies it for the caller (e.g. a row id)."""

    key: Any
    messages: list[dict]
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: Optional[float] = None
    extra: dict = field(default_factory=dict)


class _Retry(Exception):
    def __init__(self, reason: str, delay: Optional[float] = None, connection: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
        self.connection = connection


class _Fail(Exception):
    """A failure for this prompt only, not retried."""


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def secret_forms(key: Optional[str]) -> list[str]:
    """Every way an HTTP stack or a log line may print ``key``: raw, escaped (repr, JSON, bytes),
    and base64 (basic auth ``user:key`` and the key alone). Longest first, for redaction."""
    if not key:
        return []
    forms = {key, repr(key)[1:-1], json.dumps(key)[1:-1], key.encode("unicode_escape").decode("ascii", "replace"),
             repr(key.encode("utf-8", "replace"))[2:-1], base64.b64encode(key.encode("utf-8", "replace")).decode()}
    for user in ("", "user", "api"):
        forms.add(base64.b64encode(f"{user}:{key}".encode("utf-8", "replace")).decode())
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


class ApiTeacher:
    """Chat completions from an OpenAI-compatible endpoint.

    Args:
        cfg: the ``teacher.api`` section (:class:`kdistill.config.TeacherApiConfig`).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = f"api:{cfg.model}"
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key: Optional[str] = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"teacher.api.api_key_env: environment variable {cfg.api_key_env} is not set (it should hold the API key)"
                )
            bad = sorted({f"{ord(c):#04x}" for c in key if ord(c) < 0x20 or ord(c) == 0x7F})
            if bad:  # an HTTP library would refuse the header and print it: never send it
                raise ConfigError(
                    f"teacher.api.api_key_env: the key in ${cfg.api_key_env} contains control characters ({', '.join(bad)}"
                    "; a trailing \\r comes from a file saved with Windows line endings); set it without them"
                )
            self._key = key
        self._secrets = secret_forms(self._key)
        self.stats: Counter = Counter()
        self.errors: Counter = Counter()
        self._verified = False
        self._conn_failures_in_a_row = 0

    def __repr__(self) -> str:  # never show the key
        return f"ApiTeacher(model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    # -- helpers ---------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for form in self._secrets:
            text = text.replace(form, "***")
        return text

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max, self.cfg.backoff_base * (2 ** attempt))
        return base * (0.5 + random.random())

    def _body(self, job: Job) -> dict:
        body: dict = {"model": self.cfg.model, "messages": job.messages, "max_tokens": job.max_tokens,
                      "temperature": job.temperature}
        if job.top_p is not None:
            body["top_p"] = job.top_p
        body.update(self.cfg.extra_body)
        body.update(job.extra)
        return body

    def _server_says(self, resp) -> str:
        try:
            data = resp.json()
            msg = data.get("error", data) if isinstance(data, dict) else data
            if isinstance(msg, dict):
                msg = msg.get("message", msg)
            text = str(msg)
        except Exception:  # noqa: BLE001
            text = resp.text
        text = " ".join(self._redact(text).split())
        return text[:200]

    def _fatal_for_status(self, resp) -> Optional[ApiError]:
        code = resp.status_code
        if code in (401, 403):
            where = f"the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env else "teacher.api.api_key_env (no key is sent)"
            return ApiError(
                f"teacher.api: {self.cfg.base_url} refused the request (HTTP {code}: {self._server_says(resp)}); check {where}"
            )
        if code == 404:
            return ApiError(
                f"teacher.api: HTTP 404 from {self.url}: unknown model {self.cfg.model!r} or wrong base_url "
                f"(it usually ends in /v1); server said: {self._server_says(resp)}"
            )
        return None

    # -- one request, with retries ---------------------------------------------------------------

    async def _attempt(self, client, job: Job) -> Completion:
        import httpx

        try:
            resp = await client.post(self.url, json=self._body(job), headers=self._headers())
        except httpx.TimeoutException as exc:
            if not self._verified and isinstance(exc, httpx.ConnectTimeout):
                raise ApiError(f"teacher.api: cannot reach {self.cfg.base_url} (connect timeout); is the server running?") from None
            raise _Retry(f"timeout after {self.cfg.timeout:g} s") from None
        except httpx.LocalProtocolError as exc:  # the request itself cannot be sent: retrying will not help
            raise ApiError(f"teacher.api: the request to {self.cfg.base_url} could not be sent "
                           f"({type(exc).__name__}: {self._redact(str(exc))})") from None
        except httpx.TransportError as exc:
            if not self._verified:
                raise ApiError(
                    f"teacher.api: cannot reach {self.cfg.base_url} ({type(exc).__name__}: {self._redact(str(exc))}); "
                    "is the server running and base_url right?"
                ) from None
            raise _Retry(f"connection error ({type(exc).__name__})", connection=True) from None
        fatal = self._fatal_for_status(resp)
        if fatal is not None:
            raise fatal
        code = resp.status_code
        if code == 429 or code >= 500:
            raise _Retry(f"HTTP {code}", delay=parse_retry_after(resp.headers.get("retry-after")))
        if code >= 400:
            raise _Fail(f"HTTP {code}: {self._server_says(resp)}")
        self._verified = True  # the endpoint, model and key work
        return self._parse(job, resp)

    def _parse(self, job: Job, resp) -> Completion:
        """A 200 response -> :class:`Completion`; raises ``_Retry`` for a malformed or empty answer."""
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("malformed response") from None
        if not isinstance(content, str) or not content.strip():
            raise _Retry("empty response")
        return Completion(text=content, finish_reason=finish or "stop")

    async def acomplete(self, client, job: Job) -> Completion:
        """One completion with retries; a failure is returned (``text=None``), fatal errors raise."""
        reason = "no attempt"
        connection_only = True
        for attempt in range(self.cfg.max_retries + 1):
            self.stats["requests"] += 1
            try:
                out = await self._attempt(client, job)
                out.attempts = attempt + 1
                self._conn_failures_in_a_row = 0
                return out
            except _Fail as exc:
                reason, connection_only = str(exc), False
                break
            except _Retry as exc:
                reason = exc.reason
                connection_only = connection_only and exc.connection
                if attempt == self.cfg.max_retries:
                    break
                self.stats["retries"] += 1
                delay = exc.delay if exc.delay is not None else self._backoff(attempt)
                log.debug("retrying %s in %.2f s (%s)", job.key, delay, reason)
                await asyncio.sleep(delay)
        self.errors[reason.split(":")[0]] += 1
        if connection_only:
            self._conn_failures_in_a_row += 1
            if self._conn_failures_in_a_row >= max(3, self.cfg.max_concurrency):
                raise ApiError(
                    f"teacher.api: {self.cfg.base_url} stopped answering ({self._conn_failures_in_a_row} prompts in a row "
                    f"failed {self.cfg.max_retries + 1} times with connection errors); rerun to continue"
                )
        else:
            self._conn_failures_in_a_row = 0
        return Completion(text=None, error=reason, attempts=attempt + 1)

    # -- many requests -----------------------------------------------------------------------------

    async def _run(self, jobs: Iterable[Job], on_result: Callable[[Job, Completion], None]) -> None:
        import httpx

        n = self.cfg.max_concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        timeout = httpx.Timeout(self.cfg.timeout)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:  # env: proxies, CA bundle
            it = iter(jobs)
            if not self._verified:  # a probe first: a bad key/model/url fails after one request
                first = next(it, None)
                if first is None:
                    return
                on_result(first, await self.acomplete(client, first))

            async def worker():
                for job in it:  # the shared iterator hands each job to exactly one worker
                    on_result(job, await self.acomplete(client, job))

            tasks = [asyncio.ensure_future(worker()) for _ in range(n)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    def run(self, jobs: Iterable[Job], on_result: Callable[[Job, Completion], None]) -> None:
        """Send every job (``max_concurrency`` at a time); ``on_result`` is called as each one finishes,
        always from this thread. Raises :class:`ApiError` on a fatal endpoint problem."""
        asyncio.run(self._run(jobs, on_result))

    def complete_many(self, jobs: list[Job]) -> list[Completion]:
        """Completions in the order of ``jobs``."""
        out: dict[int, Completion] = {}
        keyed = [Job(i, j.messages, j.temperature, j.max_tokens, j.top_p, j.extra) for i, j in enumerate(jobs)]
        self.run(keyed, lambda job, c: out.__setitem__(job.key, c))
        return [out[i] for i in range(len(jobs))]

    def summary(self) -> dict:
        return {"requests": self.stats["requests"], "retries": self.stats["retries"],
                "failure_reasons": dict(self.errors)}
