"""The reward HTTP API: the server (``rlhf-ray serve-rm``) and the client (``reward.url``).

A reward that lives outside the training job (a reward model on its own machines, a
verifier, a judge) is reached through this small JSON API, version 1:

    GET  /health   -> {"ok": true}                                            (no auth)
    GET  /info     -> {"api": 1, "model": ..., "function": ..., "max_episodes": N,
                       "max_body_bytes": B}
    POST /score    {"episodes": [{"prompt": str, "response": str, "answer": str|number|null}]}
                   -> {"scores": [float, ...]}                     (one per episode, in order)

``answer`` is optional (the ground truth for checkable rewards). With a token configured,
``/info`` and ``/score`` need ``Authorization: Bearer <token>``. Every error is JSON,
``{"error": {"status": S, "message": "..."}}``:

    400  the body is not JSON (or not UTF-8, or nested too deep)
    401  no bearer token; 403 a wrong token
    404  unknown route; 405 wrong method; 415 a content type other than JSON
    413  the body is larger than ``max_body_kb`` or has more than ``max_episodes`` episodes
    422  JSON of the wrong shape; the message names the field, e.g. ``episodes[3].prompt``
    500  the server's own fault, e.g. its reward function raised (the message says which)

The server is FastAPI on uvicorn: both are already in the dependency set (vLLM serves its
OpenAI API with them), they are maintained, and an async app lets requests that arrive
together share one scoring batch (``MicroBatcher``). It needs no Ray, so a team can run it
anywhere. Ray Serve would tie the endpoint to a Ray cluster for no gain here.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse
from http.client import HTTPException

from starlette.requests import Request  # module level: FastAPI resolves handler annotations here

from rlhf_ray.config import RewardConfig, ServeRMConfig
from rlhf_ray.errors import UserError
from rlhf_ray.workers.reward import MicroBatcher, RewardError, RewardScorer, ScoreItem

API_VERSION = 1
RETRY_STATUS = (429, 502, 503, 504)
EPISODE_KEYS = ("prompt", "response", "answer")


# --------------------------------------------------------------------------- client


class RemoteReward:
    """Scores through an endpoint that speaks this API. Every error is a ``RewardError``
    naming the URL and, for an HTTP error, the status and the server's message; the token
    never appears in one."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0,
                 retries: int = 3):
        self.url, self.token = url.rstrip("/"), token
        self.base_path = urllib.parse.urlsplit(self.url).path
        self.timeout_s, self.retries = timeout_s, retries
        self.max_episodes = 1024
        self._local = threading.local()  # one kept-alive connection per calling thread

    @classmethod
    def from_config(cls, reward: RewardConfig) -> RemoteReward:
        return cls(reward.url, os.environ.get(reward.url_token_env) or None,
                   reward.url_timeout_s, reward.url_retries)

    def check(self) -> dict:
        """``GET /info``: the endpoint is up, accepts our token and speaks API version 1."""
        info = self._request("GET", "/info")
        if not isinstance(info, dict) or info.get("api") != API_VERSION:
            raise RewardError(f"reward.url {self.url}/info: expected a reward endpoint of API "
                              f"version {API_VERSION} (see `rlhf-ray serve-rm`), got {info!r:.200}")
        self.max_episodes = int(info.get("max_episodes", self.max_episodes))
        return info

    def score(self, items: list[ScoreItem]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(items), self.max_episodes):
            chunk = items[start: start + self.max_episodes]
            body = {"episodes": [{"prompt": i.prompt, "response": i.response,
                                  "answer": _json_answer(i.answer)} for i in chunk]}
            reply = self._request("POST", "/score", body)
            got = reply.get("scores") if isinstance(reply, dict) else None
            if (not isinstance(got, list) or len(got) != len(chunk)
                    or not all(_is_finite_number(s) for s in got)):
                raise RewardError(f"reward.url {self.url}/score: expected {{\"scores\": [...]}} with "
                                  f"{len(chunk)} finite numbers, got {reply!r:.200}")
            scores.extend(float(s) for s in got)
        return scores

    def _request(self, method: str, path: str, body: dict | None = None):
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                status, raw = self._send(method, path, data, headers)
            except (OSError, HTTPException) as e:  # refused, reset, timed out, bad reply
                if not last:
                    self._backoff(attempt)
                    continue
                what = ("timed out" if isinstance(e, TimeoutError)
                        else f"cannot connect ({type(e).__name__}: {e})")
                raise RewardError(f"reward.url {url}: {what} after {attempt + 1} attempt(s), "
                                  f"timeout {self.timeout_s:g} s each") from None
            if status >= 400:
                if status in RETRY_STATUS and not last:
                    self._backoff(attempt)
                    continue
                raise RewardError(f"reward.url {url}: HTTP {status}: {_error_message(raw)}")
            try:
                return json.loads(raw)
            except ValueError:
                raise RewardError(f"reward.url {url}: the reply is not JSON: {raw[:200]!r}") from None
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, data: bytes | None, headers: dict) -> tuple[int, bytes]:
        """One exchange on this thread's kept-alive connection. A kept connection that the
        server closed while it sat idle is reopened once, at no attempt's cost."""
        for fresh in (False, True):
            conn = getattr(self._local, "conn", None)
            if conn is None or fresh:
                if conn is not None:
                    conn.close()
                parts = urllib.parse.urlsplit(self.url)
                kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                conn = self._local.conn = kind(parts.hostname, parts.port, timeout=self.timeout_s)
            reused = conn.sock is not None
            try:
                conn.request(method, self.base_path + path, body=data, headers=headers)
                reply = conn.getresponse()
                return reply.status, reply.read()
            except (OSError, HTTPException) as e:
                conn.close()
                self._local.conn = None
                if not reused or isinstance(e, TimeoutError):
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(min(8.0, 0.5 * 2 ** attempt))


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except Exception:
        return raw[:200].decode("utf-8", "replace") or "no message"


def _json_answer(answer):
    return answer if answer is None or isinstance(answer, (str, int, float)) else str(answer)


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- server


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_episodes(payload, max_episodes: int) -> list[ScoreItem]:
    """The ``/score`` body as ScoreItems, or an ApiError (422/413) naming the field."""
    if not isinstance(payload, dict):
        raise ApiError(422, f"body: expected a JSON object {{\"episodes\": [...]}}, "
                            f"got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"episodes"})
    if unknown:
        raise ApiError(422, f"body: unknown key {unknown[0]!r}; expected only 'episodes'")
    if "episodes" not in payload:
        raise ApiError(422, "body.episodes: missing; expected a list of {prompt, response, answer?}")
    episodes = payload["episodes"]
    if not isinstance(episodes, list):
        raise ApiError(422, f"episodes: expected a list, got {type(episodes).__name__}")
    if len(episodes) > max_episodes:
        raise ApiError(413, f"episodes: {len(episodes)} in one request; this server takes at "
                            f"most {max_episodes} (max_episodes)")
    items = []
    for i, row in enumerate(episodes):
        if not isinstance(row, dict):
            raise ApiError(422, f"episodes[{i}]: expected an object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(EPISODE_KEYS))
        if unknown:
            raise ApiError(422, f"episodes[{i}]: unknown key {unknown[0]!r}; expected prompt, "
                                "response and optionally answer")
        for key in ("prompt", "response"):
            if key not in row:
                raise ApiError(422, f"episodes[{i}].{key}: missing; expected a string")
            if not isinstance(row[key], str):
                raise ApiError(422, f"episodes[{i}].{key}: expected a string, "
                                    f"got {type(row[key]).__name__}")
        answer = row.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise ApiError(422, f"episodes[{i}].answer: expected a string, a number or null, "
                                f"got {type(answer).__name__}")
        items.append(ScoreItem(row["prompt"], row["response"], answer, f"request item {i}"))
    return items


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(scorer: RewardScorer, cfg: ServeRMConfig, token: str | None):
    """The FastAPI app around ``scorer`` (see the module docstring for the API)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    max_body = cfg.max_body_kb * 1024
    batcher = MicroBatcher(scorer.score, wait_s=cfg.batch_wait_ms / 1000)
    app = FastAPI(title="rlhf-ray reward endpoint", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "message": message}}, status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")):
            raise ApiError(403, "wrong bearer token")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise ApiError(413, f"body of {length} bytes; this server takes at most {max_body} "
                                "(max_body_kb)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body:
                raise ApiError(413, f"body over {max_body} bytes (max_body_kb)")
        return bytes(body)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/info")
    async def info(request: Request):
        authorize(request)
        return {"api": API_VERSION, **scorer.describe(), "max_episodes": cfg.max_episodes,
                "max_body_bytes": max_body, "requests": batcher.stats["requests"],
                "episodes": batcher.stats["episodes"], "batches": batcher.stats["batches"]}

    @app.post("/score")
    async def score(request: Request):
        authorize(request)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("application/json", ""):
            raise ApiError(415, f"content type {kind!r}; expected application/json")
        body = await read_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
            raise ApiError(400, f"body is not valid JSON: {str(e)[:200]}") from None
        items = parse_episodes(payload, cfg.max_episodes)
        if not items:
            return {"scores": []}
        try:
            scores = await batcher.submit(items)
        except RewardError as e:
            return error(500, str(e))
        return {"scores": scores}

    return app


def serve(cfg: ServeRMConfig, out=sys.stdout) -> None:
    """Load the scorer and serve until SIGINT/SIGTERM. Prints one line with the address
    (the port is resolved when ``port=0``); the token itself is never printed."""
    import uvicorn

    token = os.environ.get(cfg.token_env) or None
    if token is None and not is_loopback(cfg.host):
        raise UserError(f"serve-rm: host {cfg.host} is reachable from other machines; set a "
                        f"bearer token in the environment variable {cfg.token_env} "
                        "(or bind host=127.0.0.1)")
    scorer = RewardScorer(cfg.reward, cfg.dtype)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)  # connections queue from here on, so the printed address is usable at once
    except OSError as e:
        sock.close()
        raise UserError(f"serve-rm: cannot bind {cfg.host}:{cfg.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
    auth = f"bearer token from ${cfg.token_env}" if token else "none (loopback only)"
    print(f"serve-rm: listening on http://{host}:{port}  auth: {auth}  "
          f"scoring: {json.dumps(scorer.describe())}", file=out, flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(scorer, cfg, token), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
