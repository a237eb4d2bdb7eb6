"""`rlhf-ray jobs`: list, inspect, follow and stop Ray jobs through Ray's Job Submission API.

    rlhf-ray jobs list                  every submitted job: id, status, start time, entrypoint
    rlhf-ray jobs status ID             status and message; exit 1 if FAILED or STOPPED, else 0
    rlhf-ray jobs logs ID               the job's output so far
    rlhf-ray jobs logs ID --follow      streamed until the job ends; exit 0 iff it SUCCEEDED
    rlhf-ray jobs stop ID               stop it, wait (--timeout, 30 s) for it to end

The address is the cluster's dashboard (``--address``, else ``RAY_ADDRESS``, else
http://127.0.0.1:8265). An explicit ``--address`` wins over ``RAY_ADDRESS``.

Token authentication: a Ray 2.60 head started where a token exists (or under
``RAY_AUTH_MODE=token``) refuses requests without it. The token is found as Ray's own
clients find it: ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``; it is sent as an ``Authorization: Bearer`` header. Under
``RAY_AUTH_MODE=disabled`` no token is sent.

Every failure to reach or to authenticate with the cluster is a ``UserError`` whose one line
names the address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from rlhf_ray.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def auth_token() -> tuple[str | None, str]:
    """``(token or None, where it came from)``, in the order Ray's clients look."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH names {path}, which is missing or empty")
        return token, str(path)
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(path)
    return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


@contextlib.contextmanager
def cluster_errors(address: str, job_id: str | None = None):
    """Turn the SDK's connection, authentication and not-found errors into one-line ``UserError``s."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        token, source = auth_token()
        if token is None or str(e).startswith("Authentication required"):
            raise UserError(f"{address} requires an authentication token and none was sent ({source}); "
                            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
        raise UserError(f"{address} rejected the authentication token from {source}; "
                        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot reach the Ray dashboard at {address} ({reason}); is the head running, "
                        "and is this its dashboard address (port 8265 by default)?") from None
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if job_id and "does not exist" in text:
            raise UserError(f"no job '{job_id}' on {address}") from None
        if "Request failed with status code" in text or "Version check" in text:
            raise UserError(f"{address}: {text}") from None
        raise


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``, carrying the cluster token if one is found."""
    from ray.job_submission import JobSubmissionClient

    token, _ = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its argument; --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        with cluster_errors(address):
            return JobSubmissionClient(address, headers=headers)
    except ValueError as e:  # not an address Ray can parse
        raise UserError(f"bad cluster address {address!r} ({e}); give the dashboard's URL, "
                        "e.g. http://HEAD:8265") from None
    finally:
        os.environ.update(saved)


def short_entrypoint(entrypoint: str, width: int = 60) -> str:
    """``/venv/bin/python -m rlhf_ray.cli ppo cfg.yaml ... ray.address=auto`` -> ``rlhf-ray ppo cfg.yaml ...``."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        words = entrypoint.split()
    if words[1:3] == ["-m", "rlhf_ray.cli"]:
        words = ["rlhf-ray", *[w for w in words[3:] if w != "ray.address=auto"]]
    text = " ".join(words)
    return text if len(text) <= width else text[: width - 3] + "..."


def list_jobs(client, address: str) -> list:
    """The submitted jobs (not plain drivers), oldest first."""
    with cluster_errors(address):
        jobs = [j for j in client.list_jobs() if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def format_table(jobs: list) -> str:
    rows = [("JOB ID", "STATUS", "START", "ENTRYPOINT")]
    for j in jobs:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append((j.submission_id, _status(j.status), start, short_entrypoint(j.entrypoint)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows)


def job_info(client, address: str, job_id: str):
    with cluster_errors(address, job_id):
        return client.get_job_info(job_id)


def job_logs(client, address: str, job_id: str) -> str:
    with cluster_errors(address, job_id):
        return client.get_job_logs(job_id)


def follow(client, address: str, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's output to ``out`` until it ends; return its final status.

    Uses the SDK's log tail (a websocket that closes when the job ends); if that connection
    breaks, falls back to polling the full log and printing what is new.
    """
    import asyncio

    import aiohttp

    out = out or sys.stdout
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    job_info(client, address, job_id)  # a missing job is an error here, not an empty stream
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    streamed = True
    with cluster_errors(address, job_id):
        try:
            asyncio.run(tail())
        except (RuntimeError, OSError, aiohttp.ClientError) as e:  # a broken stream, not the job
            streamed = False
            print(f"(the log stream from {address} broke: {' '.join(str(e).split()) or repr(e)}; "
                  "polling instead)", file=sys.stderr)
        while True:  # the stream closes when the job ends; its final status may lag a moment
            status = _status(client.get_job_status(job_id))
            if not streamed:
                logs = client.get_job_logs(job_id)
                out.write(logs[written:])
                out.flush()
                written = max(written, len(logs))
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    return status


def stop(client, address: str, job_id: str, timeout_s: float = 30.0) -> tuple[bool, str]:
    """Ask the job to stop; wait up to ``timeout_s`` for it to end. ``(was running, final status)``."""
    with cluster_errors(address, job_id):
        was_running = client.stop_job(job_id)
        deadline = time.time() + timeout_s
        status = _status(client.get_job_status(job_id))
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(0.5)
            status = _status(client.get_job_status(job_id))
    return was_running, status


def _status(status) -> str:
    return str(getattr(status, "value", status))


def follow_command(client, address: str, job_id: str) -> int:
    """Print the job's output until it ends, then its final status; 0 iff it SUCCEEDED.

    Ctrl-C stops following, not the job.
    """
    print(f"job {job_id} on {address}: following its logs (Ctrl-C stops following, not the job)",
          file=sys.stderr)
    try:
        status = follow(client, address, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`rlhf-ray jobs stop {job_id}` "
              "stops it)", file=sys.stderr)
        return 130
    message = job_info(client, address, job_id).message if status != "SUCCEEDED" else None
    message = (message or "").split(", last available logs")[0].strip()  # those were just printed
    print(f"job {job_id}: {status}" + (f": {message}" if message else ""))
    return 0 if status == "SUCCEEDED" else 1


def jobs_main(action: str, address: str | None, job_id: str | None = None, follow_logs: bool = False,
              timeout_s: float = 30.0) -> int:
    """``rlhf-ray jobs ACTION``; the exit status of each is in the module docstring."""
    address = address or default_address()
    client = connect(address)
    if action == "list":
        print(format_table(list_jobs(client, address)))
        return 0
    if action == "status":
        info = job_info(client, address, job_id)
        status = _status(info.status)
        print(f"job {job_id}: {status}" + (f": {info.message}" if info.message else ""))
        return 1 if status in ("FAILED", "STOPPED") else 0
    if action == "logs":
        if follow_logs:
            return follow_command(client, address, job_id)
        sys.stdout.write(job_logs(client, address, job_id))
        return 0
    if action == "stop":
        was_running, status = stop(client, address, job_id, timeout_s)
        if not was_running:
            print(f"job {job_id} had already ended: {status}")
        elif status in TERMINAL:
            print(f"job {job_id}: {status}")
        else:
            print(f"job {job_id}: still {status} {timeout_s:.0f} s after the stop request", file=sys.stderr)
            return 1
        return 0
    raise ValueError(f"unknown jobs action {action!r}")
