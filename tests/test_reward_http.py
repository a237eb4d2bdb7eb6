"""The reward HTTP endpoint (`rlhf-ray serve-rm`) and its client (`reward.url`), on a real
server process bound to a free localhost port, with the tiny reward model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf_ray import cli
from rlhf_ray.batch import Episode
from rlhf_ray.config import RewardConfig
from rlhf_ray.workers.group import WorkerGroup, WorkerResources
from rlhf_ray.workers.reward import RewardError, RewardServer, ScoreItem
from rlhf_ray.workers.reward_http import RemoteReward

ROOT = Path(__file__).resolve().parents[1]
HELPERS = str(ROOT / "tests" / "helpers")
TOKEN = "tok-7f3a-never-printed"
FREE = WorkerResources(num_cpus=0)
TEXTS = [("What is 2 + 3?", "2 + 3 = 5", "5"), ("What is 7 * 6?", "It is 41", "42"),
         ("Say hi", "hi there, friend", None), ("What is 9 - 4?", "5", 5)]


@contextlib.contextmanager
def serve_rm(*overrides: str, env: dict | None = None):
    """``rlhf-ray serve-rm port=0 ...`` as a real process; yields (base url, process)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [HELPERS, os.environ.get("PYTHONPATH")]))}
    environment.pop("RLHF_RAY_REWARD_TOKEN", None)
    environment.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "serve-rm", "port=0", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        line = proc.stdout.readline()  # the one line it prints once listening
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"serve-rm did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.first_line = line
        yield match.group(1), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON reply) for one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def episodes() -> list[Episode]:
    return [Episode(prompt_ids=[1], response_ids=[2], prompt_text=p, response_text=r, logprobs=[0.0],
                    finish_reason="stop", policy_version=0, prompt_index=i, answer=None if a is None else str(a))
            for i, (p, r, a) in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def open_server(tiny_rm):
    """No token (loopback only), the tiny RM plus the exact-answer checker, small caps."""
    with serve_rm(f"reward.model={tiny_rm}", "reward.function=arithmetic", "max_episodes=8",
                  "max_body_kb=16") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def auth_server():
    with serve_rm("reward.function=arithmetic", env={"RLHF_RAY_REWARD_TOKEN": TOKEN}) as (url, proc):
        yield url, proc


# --------------------------------------------------------------------------- scores


def test_scores_equal_the_in_process_reward_server(ray_local, open_server, tiny_rm):
    url, _ = open_server
    eps = episodes()
    local_cfg = RewardConfig(model=tiny_rm, function="arithmetic")
    remote_cfg = RewardConfig(url=url, url_retries=0)
    both_cfg = RewardConfig(model=tiny_rm, function="arithmetic", url=url)
    groups = [WorkerGroup(RewardServer, "reward", 1, args=(c,), resources=FREE)
              for c in (local_cfg, remote_cfg, both_cfg)]
    try:
        local, remote, both = (g.call("score", eps)[0] for g in groups)
    finally:
        for g in groups:
            g.shutdown()
    direct = RemoteReward(url).score([ScoreItem.of(e) for e in eps])
    assert remote == pytest.approx(local, abs=1e-5) and direct == pytest.approx(local, abs=1e-5)
    assert both == pytest.approx([2 * s for s in local], abs=1e-5)  # url + local parts: their sum
    # the checker part is visible: right answers score 1 more than the model alone
    assert [round(s - m, 4) for s, m in zip(local, _model_only(url, eps))] == [1.0, 0.0, 0.0, 1.0]


def _model_only(url: str, eps: list[Episode]) -> list[float]:
    """Scores of the same texts with the checker's part removed (answer=None scores 0)."""
    items = [ScoreItem(e.prompt_text, e.response_text, "no-such-answer") for e in eps]
    return RemoteReward(url).score(items)


def test_requests_that_arrive_together_share_a_batch(open_server):
    url, _ = open_server
    body = {"episodes": [{"prompt": "What is 1 + 1?", "response": "2", "answer": "2"}]}
    before = http("GET", url + "/info")[1]
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(http("POST", url + "/score", body)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = http("GET", url + "/info")[1]
    assert [r[0] for r in replies] == [200] * 16
    scores = [r[1]["scores"][0] for r in replies]  # the same episode scores the same in any batch
    assert max(scores) - min(scores) < 1e-5  # (up to float rounding of batched matmuls)
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16


# --------------------------------------------------------------------------- auth


def test_auth_on(auth_server):
    url, _ = auth_server
    body = {"episodes": [{"prompt": "What is 2 + 2?", "response": "4", "answer": "4"}]}
    assert http("GET", url + "/health")[:2] == (200, {"ok": True})  # health is open
    status, reply, headers = http("POST", url + "/score", body)
    assert status == 401 and "Bearer" in headers.get("www-authenticate", "")
    assert "missing" in reply["error"]["message"]
    status, reply, _ = http("POST", url + "/score", body, {"Authorization": "Bearer wrong"})
    assert status == 403 and reply["error"]["message"] == "wrong bearer token"
    assert http("GET", url + "/info", headers={"Authorization": f"Basic {TOKEN}"})[0] == 403
    status, reply, _ = http("POST", url + "/score", body, {"Authorization": f"Bearer {TOKEN}"})
    assert (status, reply) == (200, {"scores": [1.0]})
    # the client reads the token from the environment variable named in config
    os.environ["RLHF_RAY_REWARD_TOKEN"] = TOKEN
    try:
        assert RemoteReward.from_config(RewardConfig(url=url)).score([ScoreItem("q", "4", "4")]) == [1.0]
    finally:
        del os.environ["RLHF_RAY_REWARD_TOKEN"]
    with pytest.raises(RewardError, match=rf"reward.url {re.escape(url)}/info: HTTP 401"):
        RemoteReward(url, retries=0).check()


def test_auth_off_on_loopback(open_server):
    url, _ = open_server
    status, reply, _ = http("POST", url + "/score",
                            {"episodes": [{"prompt": "x", "response": "y"}]})
    assert status == 200 and len(reply["scores"]) == 1


def test_a_public_address_needs_a_token():
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "serve-rm", "host=0.0.0.0", "port=0"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RLHF_RAY_REWARD_TOKEN"})
    assert proc.returncode == 1
    assert "host 0.0.0.0 is reachable from other machines" in proc.stderr
    assert "RLHF_RAY_REWARD_TOKEN" in proc.stderr


def test_the_token_is_never_printed():
    with serve_rm("host=0.0.0.0", "reward.function=arithmetic",
                  env={"RLHF_RAY_REWARD_TOKEN": TOKEN}) as (url, proc):
        local = f"http://127.0.0.1:{url.rsplit(':', 1)[1]}"
        assert http("GET", local + "/info", headers={"Authorization": "Bearer nope"})[0] == 403
        assert http("GET", local + "/info", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert "auth: bearer token from $RLHF_RAY_REWARD_TOKEN" in proc.first_line
    assert TOKEN not in proc.first_line + out + err


# --------------------------------------------------------------------------- 4xx


def _chunked_oversize(url: str) -> tuple[int, dict]:
    """A body sent without Content-Length (chunked), larger than max_body_kb."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        chunk = b'{"episodes": [' + b" " * 8000
        try:  # the server may answer and close as soon as the cap is passed
            for _ in range(4):
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            while part := s.recv(65536):
                reply += part
        except ConnectionResetError:  # a reset after the reply arrived
            pass
    assert reply, "the server closed the connection without a reply"
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


EP = {"prompt": "p", "response": "r"}
FOUR_XX = [
    ("malformed JSON", {"raw": b'{"episodes": [', "status": 400, "needle": "not valid JSON"}),
    ("not UTF-8", {"raw": b'{"episodes": ["\xff\xfe"]}', "status": 400, "needle": "not valid JSON"}),
    ("a list at top level", {"body": [EP], "status": 422, "needle": "body: expected a JSON object"}),
    ("no episodes key", {"body": {}, "status": 422, "needle": "body.episodes: missing"}),
    ("an unknown top-level key", {"body": {"episodes": [], "epsiodes": []}, "status": 422,
                                  "needle": "unknown key 'epsiodes'"}),
    ("episodes not a list", {"body": {"episodes": "p"}, "status": 422, "needle": "episodes: expected a list"}),
    ("an episode not an object", {"body": {"episodes": [EP, 3]}, "status": 422,
                                  "needle": "episodes[1]: expected an object"}),
    ("a prompt of the wrong type", {"body": {"episodes": [{"prompt": 1, "response": "r"}]}, "status": 422,
                                    "needle": "episodes[0].prompt: expected a string, got int"}),
    ("a missing response", {"body": {"episodes": [{"prompt": "p"}]}, "status": 422,
                            "needle": "episodes[0].response: missing"}),
    ("an answer of the wrong type", {"body": {"episodes": [{**EP, "answer": [1]}]}, "status": 422,
                                     "needle": "episodes[0].answer: expected a string, a number or null"}),
    ("an unknown episode key", {"body": {"episodes": [{**EP, "score": 1}]}, "status": 422,
                                "needle": "episodes[0]: unknown key 'score'"}),
    ("too many episodes", {"body": {"episodes": [EP] * 9}, "status": 413, "needle": "at most 8"}),
    ("a body over max_body_kb", {"raw": b'{"episodes": [' + b" " * 20000 + b"]}", "status": 413,
                                 "needle": "at most 16384"}),
    ("a non-JSON content type", {"body": {"episodes": []}, "headers": {"Content-Type": "text/plain"},
                                 "status": 415, "needle": "expected application/json"}),
    ("an unknown route", {"path": "/scores", "body": {}, "status": 404, "needle": "Not Found"}),
    ("a wrong method", {"path": "/score", "method": "GET", "status": 405, "needle": "Method Not Allowed"}),
]


@pytest.mark.parametrize("case", [c for _, c in FOUR_XX], ids=[n for n, _ in FOUR_XX])
def test_bad_requests_get_a_4xx_with_a_json_error(open_server, case):
    url, _ = open_server
    status, reply, _ = http(case.get("method", "POST"), url + case.get("path", "/score"),
                            case.get("body"), case.get("headers"), case.get("raw"))
    assert status == case["status"], reply
    assert reply["error"]["status"] == status and case["needle"] in reply["error"]["message"]


def test_a_chunked_body_over_the_cap_gets_413(open_server):
    status, reply = _chunked_oversize(open_server[0])
    assert status == 413 and "max_body_kb" in reply["error"]["message"]


def test_a_failing_reward_function_is_a_500_that_names_it():
    with serve_rm("reward.function=reward_fns:always_raises") as (url, proc):
        status, reply, _ = http("POST", url + "/score", {"episodes": [EP, EP]})
        assert status == 500
        assert ("reward function 'reward_fns:always_raises' raised ValueError" in reply["error"]["message"]
                and "request item 0" in reply["error"]["message"])
        assert http("GET", url + "/health")[0] == 200  # and it keeps serving


# --------------------------------------------------------------------------- fuzz


def test_fuzzed_bodies_and_headers_never_get_a_5xx(open_server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, proc = open_server
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    episode = st.fixed_dictionaries({}, optional={"prompt": values | st.text(max_size=30),
                                                  "response": values | st.text(max_size=30),
                                                  "answer": values, "extra": values})
    bodies = (st.binary(max_size=300).map(lambda b: ("raw", b))
              | values.map(lambda v: ("json", v))
              | st.lists(episode, max_size=10).map(lambda eps: ("json", {"episodes": eps})))
    header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    headers = st.dictionaries(st.sampled_from(["Authorization", "Content-Type", "X-Anything",
                                               "Accept", "Content-Encoding"]), header_text, max_size=3)
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True)
    @given(body=bodies, hdrs=headers, method=st.sampled_from(["POST", "POST", "GET", "PUT"]),
           path=st.sampled_from(["/score", "/score", "/info", "/health", "/x"]))
    def one(body, hdrs, method, path):
        kind, value = body
        raw = value if kind == "raw" else json.dumps(value).encode()
        status, reply, _ = http(method, url + path, headers=hdrs, raw=raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, reply, body, hdrs)
        if status >= 400:
            assert reply["error"]["status"] == status

    one()
    assert sum(seen.values()) == 150 and any(s == 200 for s in seen) and any(s >= 400 for s in seen)
    assert proc.poll() is None and http("GET", url + "/health")[:2] == (200, {"ok": True})


# --------------------------------------------------------------------------- client errors


@contextlib.contextmanager
def silent_server():
    """A socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(tmp_path, capsys, url: str, *extra: str) -> tuple[int, str]:
    code = cli.main(["generate", str(ROOT / "launch/configs/generate_tiny.yaml"), f"run_dir={tmp_path / 'run'}",
                     "logging.wandb_mode=disabled", "logging.progress_bar=false",
                     "reward.function=null", f"reward.url={url}", "reward.url_retries=1", *extra])
    return code, capsys.readouterr().err


def test_reward_url_refused_names_the_url(ray_local, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    code, err = _generate(tmp_path, capsys, url)
    assert code == 1
    assert f"reward.url {url}/info: cannot connect (ConnectionRefusedError" in err
    assert "after 2 attempt(s)" in err and "reward worker rank 0" in err
    assert not (tmp_path / "run" / "episodes.jsonl").exists()


def test_reward_url_timeout_names_the_url(ray_local, tmp_path, capsys):
    with silent_server() as url:
        code, err = _generate(tmp_path, capsys, url, "reward.url_timeout_s=1")
    assert code == 1
    assert f"reward.url {url}/info: timed out after 2 attempt(s), timeout 1 s each" in err


class ScriptedEndpoint:
    """A plain HTTP server that answers POSTs from a script of (status, JSON) replies."""

    def __init__(self, replies: list[tuple[int, object]]):
        import http.server

        self.replies, self.calls = list(replies), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.calls.append(time.monotonic())
                self.rfile.read(int(self.headers["Content-Length"]))
                code, body = outer.replies.pop(0)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


WARMING = (503, {"error": {"status": 503, "message": "warming up"}})


def test_retries_back_off_and_then_succeed():
    with ScriptedEndpoint([WARMING, WARMING, (200, {"scores": [0.5]})]) as endpoint:
        assert RemoteReward(endpoint.url, retries=2).score([ScoreItem("p", "r")]) == [0.5]
        gaps = [b - a for a, b in zip(endpoint.calls, endpoint.calls[1:])]
    assert len(endpoint.calls) == 3 and gaps[1] >= gaps[0] >= 0.45  # backoff 0.5 s, then 1 s


def test_retries_are_bounded_and_the_error_names_url_and_status():
    with ScriptedEndpoint([WARMING, WARMING]) as endpoint:
        with pytest.raises(RewardError, match=rf"reward.url {re.escape(endpoint.url)}/score: "
                                              r"HTTP 503: warming up"):
            RemoteReward(endpoint.url, retries=1).score([ScoreItem("p", "r")])
    assert len(endpoint.calls) == 2


@pytest.mark.parametrize("reply", [{"scores": [1.0, 2.0]}, {"scores": ["1"]}, {"score": [1.0]},
                                   {"scores": [None]}])
def test_a_reply_of_the_wrong_shape_is_an_error(reply):
    with ScriptedEndpoint([(200, reply)]) as endpoint:
        with pytest.raises(RewardError, match=r"/score: expected \{\"scores\": \[...\]\} with 1 finite"):
            RemoteReward(endpoint.url, retries=0).score([ScoreItem("p", "r")])


def test_a_4xx_is_not_retried():
    with ScriptedEndpoint([(422, {"error": {"status": 422, "message": "episodes[0].prompt: bad"}})]) as endpoint:
        with pytest.raises(RewardError, match="HTTP 422: episodes\\[0\\].prompt: bad"):
            RemoteReward(endpoint.url, retries=3).score([ScoreItem("p", "r")])
    assert len(endpoint.calls) == 1


# --------------------------------------------------------------------------- end to end


SECRETS = {"RLHF_RAY_REWARD_TOKEN": TOKEN, "WANDB_API_KEY": "wandbkey" + "5" * 32,
           "MY_SERVICE_TOKEN": "service-token-3c9d"}


def test_ppo_scores_through_reward_url_and_no_secret_is_written(tmp_path):
    """A tiny GRPO run through the CLI whose only reward is the endpoint (with auth), in its
    own process and private Ray, W&B offline. Every episode it trains on was scored by the
    endpoint, and no secret from the environment appears in any file of the run or in its
    console output."""
    with serve_rm("reward.function=arithmetic", env={"RLHF_RAY_REWARD_TOKEN": TOKEN}) as (url, server):
        env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(
            filter(None, [HELPERS, os.environ.get("PYTHONPATH")]))}
        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "rlhf_ray.cli", "ppo", str(ROOT / "launch/configs/ppo_tiny.yaml"),
             f"run_dir={run_dir}", "reward.function=null", f"reward.url={url}",
             "logging.wandb_mode=offline", "logging.progress_bar=false", "ray.num_cpus=2"],
            capture_output=True, text=True, env=env, timeout=600)
        info = http("GET", url + "/info", headers={"Authorization": f"Bearer {TOKEN}"})[1]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "reward/mean" in summary["metrics"]
    assert info["episodes"] >= 3 * 4 * 2  # steps x prompts_per_step x sampling.n, all scored remotely
    assert (run_dir / "wandb").is_dir()
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    for path in run_dir.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 5
    for name, secret in SECRETS.items():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"{name} written to {leaks}"
