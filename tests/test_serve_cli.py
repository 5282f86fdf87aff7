"""`shardline serve` as a user runs it: a subprocess on a free port, its own Ray cluster.

It must come up and print where it serves, answer a chat request, and on SIGINT stop
taking requests, let the one in flight finish, and exit 0 leaving no Ray process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from shardline.deployments.server import free_port
from shardline.engine.pull import pull_model

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def shardline_command() -> list[str]:
    script = Path(sys.executable).parent / "shardline"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shardline"]


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (Ray puts its temp dir in them)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:160]}")
    return found


def test_expected_failures_are_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags, needle in ((["--model", "no-such-model"], "no-such-model"), (["--port", str(port)], f"127.0.0.1:{port}")):
            out = subprocess.run(shardline_command() + ["serve", *flags], capture_output=True, text=True, timeout=120)
            assert out.returncode == 2, out.stderr
            assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr
    nothing_here = dict(os.environ, RAY_TMPDIR=str(tmp_path))  # no cluster to find
    out = subprocess.run(shardline_command() + ["status"], capture_output=True, text=True, timeout=120, env=nothing_here)
    assert out.returncode == 2 and "no Ray cluster" in out.stderr.strip().splitlines()[-1]


def test_serve_answers_and_shuts_down_cleanly_on_sigint():
    pull_model("smollm2-135m", progress=False)  # the default model, as `make serve` pulls it
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="sl-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    proc, output = start_serve(
        ["--port", str(port), "--max-model-len", "2048", "--num-kv-blocks", "256", "--grace-period", "60"], env
    )
    try:
        banner = "".join(output)
        base = f"http://127.0.0.1:{port}"
        assert f"serving smollm2-135m at {base}/v1" in banner and f"curl {base}/v1/chat/completions" in banner
        assert "Prometheus scrapes http://127.0.0.1:" in banner

        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = c.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content

        # A long stream is in flight when Ctrl-C arrives: it must finish, whole.
        body = {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", f"{base}/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGINT)
                saw_draining = False
                rest = []
                for line in lines:
                    rest.append(line)
                    if not saw_draining:
                        try:
                            saw_draining = httpx.get(f"{base}/health", timeout=5).status_code == 503
                        except httpx.HTTPError:
                            pass
        events = [first[6:]] + [line[6:] for line in rest if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 200
        assert saw_draining, "new requests were still taken while draining"
        assert proc.wait(timeout=120) == 0, "".join(output[-40:])
        assert "shardline: stopping: draining" in "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while processes_mentioning(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_port_left_in_time_wait_is_free_but_a_listener_is_not():
    """The last run's server-side connections in TIME_WAIT must not keep a restarted server off its port."""
    from shardline.deployments.server import check_port_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener does
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server closes first: its side waits out TIME_WAIT
        client.recv(1)
        client.close()
    states = Path("/proc/net/tcp").read_text()
    assert f":{port:04X} " in states  # the TIME_WAIT socket is still there
    check_port_free("127.0.0.1", port)


def start_serve(flags: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """`shardline serve FLAGS` in the background; returns it and its output (stdout and stderr, as
    read so far and on), once it serves."""
    proc = subprocess.Popen(
        shardline_command() + ["serve", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=env["RAY_TMPDIR"],
    )
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("  status:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(240):
        proc.kill()
        raise AssertionError("".join(output[-40:]))
    return proc, output


def test_status_finds_the_server_and_a_sigterm_stops_it_for_an_immediate_restart(model_dir):
    """As a user types it: `shardline status` from a second process finds the cluster `shardline serve`
    started (by itself and given the address), SIGTERM stops the server with one line and exit 0,
    and a server started at once on the same port serves."""
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="sl-ray-", dir="/tmp")  # its address file and sessions: this test's own
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
    flags = ["--model", str(model_dir), "--port", str(port), "--num-kv-blocks", "64"]
    proc, output = start_serve(flags, env)
    try:
        address = address_file.read_text().strip()
        assert address.startswith("127.0.0.1:")
        for where in ([], ["--address", address]):
            out = subprocess.run(shardline_command() + ["status", "--json", *where], capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 0, out.stderr[-2000:]
            report = json.loads(out.stdout)
            assert [len(d["replicas"]) for d in report["deployments"] if d["name"] == "ModelReplica"] == [1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:  # a kept-alive connection
            for _ in range(3):
                assert http.get("/v1/models").status_code == 200
            before = len(output)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, "".join(output[-40:])
        said = "".join(output[before:])
        assert "SIGTERM received" not in said and "Traceback" not in said, said
        assert [line for line in said.splitlines() if line.strip()] == [
            "shardline: stopping: draining requests in flight, at most 30 s (Ctrl-C again: now)"
        ]
        assert not address_file.exists()

        proc, output = start_serve(flags, env)  # at once, on the same port
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(output[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while processes_mentioning(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)
