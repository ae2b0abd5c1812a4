"""A real HTTP server on 127.0.0.1 that answers like an OpenAI chat-completions endpoint.

It can be told to fail: ``server.plan[prompt] = ["429", "500", "ok"]`` makes the successive
requests for that user prompt fail in that order (modes: ok, 429, 500, 503, timeout, malformed,
empty, nochoices, length, 400). A wrong key gives 401, an unknown model 404, as real servers do.
It records every request and the largest number of requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class FakeOpenAI:
    def __init__(self, model: str = "teacher-x", key: Optional[str] = None, delay: float = 0.0):
        self.model = model
        self.key = key
        self.delay = delay
        self.retry_after = "1"
        self.timeout_sleep = 1.5
        self.plan: dict[str, list[str]] = {}
        self.responder: Callable[[list[dict]], str] = lambda msgs: "echo: " + msgs[-1]["content"]
        # vLLM's extensions: /v1/completions with prompt_logprobs (token-id prompts) and /tokenize;
        # None = routes absent (404), as on servers other than vLLM
        self.prompt_logprobs: Optional[Callable[[list[int], int], list]] = None
        self.tokenize: Optional[Callable[[str], list[int]]] = None
        self.max_logprobs = 20
        self.model_info: dict = {}  # more fields of the model's /v1/models entry (vLLM: root, max_model_len)
        self.version: Optional[str] = None  # GET /version (vLLM's); None = no such route
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd: Optional[ThreadingHTTPServer] = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body, headers: Optional[dict] = None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    return self._send(200, {"data": [{"id": server.model, **server.model_info}]})
                if self.path == "/version" and server.version is not None:
                    return self._send(200, {"version": server.version})
                self._send(404, {})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._handle(raw)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _handle(self, raw: bytes):
                if self.path == "/tokenize" and server.tokenize is not None:
                    body = json.loads(raw)
                    toks = server.tokenize(body["prompt"])
                    return self._send(200, {"tokens": toks, "count": len(toks), "max_model_len": 256})
                if self.path.endswith("/v1/completions") and server.prompt_logprobs is not None:
                    return self._completions(raw)
                if not self.path.endswith("/v1/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if server.key is not None and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                body = json.loads(raw)
                if body.get("model") != server.model:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}})
                msgs = body["messages"]
                prompt = [m for m in msgs if m["role"] == "user"][-1]["content"]
                system = next((m["content"] for m in msgs if m["role"] == "system"), None)
                with server.lock:
                    modes = server.plan.get(prompt)
                    mode = modes.pop(0) if modes else "ok"
                    server.requests.append({"prompt": prompt, "system": system, "mode": mode, "t": time.time(),
                                            "body": body})
                if server.delay:
                    time.sleep(server.delay)
                if mode in ("429",):
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": server.retry_after})
                if mode in ("500", "503"):
                    return self._send(int(mode), {"error": {"message": "server error"}})
                if mode == "400":
                    return self._send(400, {"error": {"message": "prompt too long"}})
                if mode == "timeout":
                    time.sleep(server.timeout_sleep)
                if mode == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if mode == "nochoices":
                    return self._send(200, {"choices": []})
                content = "" if mode == "empty" else server.responder(msgs)
                finish = "length" if mode == "length" else "stop"
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "model": server.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

            def _completions(self, raw: bytes):
                if server.key is not None and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                body = json.loads(raw)
                if body.get("model") != server.model:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}})
                k = body.get("prompt_logprobs")
                if k is not None and k > server.max_logprobs:
                    return self._send(400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater "
                                                                 f"than max allowed: {server.max_logprobs}"}})
                ids = body["prompt"]
                key = "ids:" + ",".join(map(str, ids[:4]))
                with server.lock:
                    modes = server.plan.get(key)
                    mode = modes.pop(0) if modes else "ok"
                    server.requests.append({"prompt": key, "mode": mode, "t": time.time(), "body": body})
                if server.delay:
                    time.sleep(server.delay)
                if mode in ("500", "503"):
                    return self._send(int(mode), {"error": {"message": "server error"}})
                if mode == "malformed":
                    return self._send(200, b'{"choices": [{"text": ')
                plp = server.prompt_logprobs(ids, k) if k is not None else None
                self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": server.model,
                                 "choices": [{"index": 0, "text": " x", "finish_reason": "length",
                                              "prompt_logprobs": plp}],
                                 "usage": {"prompt_tokens": len(ids), "completion_tokens": 1}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def prompts_requested(self) -> list[str]:
        with self.lock:
            return [r["prompt"] for r in self.requests]


def model_prompt_logprobs(model, memo: bool = False, logit_dtype=None) -> Callable[[list[int], int], list]:
    """``(ids, k) -> prompt_logprobs`` as vLLM's /v1/completions returns them, computed by ``model``
    (a causal LM): entry 0 is null; entry j maps token ids (strings) to ``{"logprob", "rank"}`` for
    the top-k of the distribution over token j, plus token j itself when it is not among them.
    ``memo``: keep every answer (a server that costs no compute the second time, for benchmarks).
    ``logit_dtype``: round the logits to this dtype first (a server computing in bfloat16)."""
    import torch

    lock = threading.Lock()
    seen: dict = {}

    def answer(ids: list[int], k: int) -> list:
        with lock:  # the server is threaded; one forward at a time
            if (tuple(ids), k) in seen:
                return seen[(tuple(ids), k)]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
                lp = torch.log_softmax((logits.to(logit_dtype) if logit_dtype else logits).float(), -1)
            out: list = [None]
            for j in range(1, len(ids)):
                row = lp[j - 1]
                top = row.topk(k)
                d = {str(int(t)): {"logprob": float(v), "rank": r + 1}
                     for r, (t, v) in enumerate(zip(top.indices, top.values))}
                own = int(ids[j])
                if str(own) not in d:
                    d[str(own)] = {"logprob": float(row[own]), "rank": int((row > row[own]).sum()) + 1}
                out.append(d)
            if memo:
                seen[(tuple(ids), k)] = out
            return out

    return answer


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve(monkeypatch, key: str, env: str):
    """Start a FakeOpenAI for a test: the key in ``env``, the loopback exempt from any proxy.

    A generator for a pytest fixture: ``yield from serve(monkeypatch, KEY, "ENV")``.
    """
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy in the environment must not intercept
    monkeypatch.setenv(env, key)
    srv = FakeOpenAI(key=key).start()
    try:
        yield srv
    finally:
        srv.stop()
