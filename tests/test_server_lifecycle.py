"""`lamina serve` starting and stopping: a port in use fails before the model loads, and
SIGINT or SIGTERM with requests in flight ends them with an error, frees their KV blocks and
exits with status 0, without a traceback.

The subprocess tests read the port from the server's log (it binds port 0), so no two runs
race for a port. Waits are on events, with generous timeouts; the time from the signal to
the exit is printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from engine.api import LLM
from engine.server import OpenAIServer, listen, uvicorn_server

LONG = {"prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}


def _wait_for(condition, message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def _data_lines(reply: httpx.Response) -> Iterator[str]:
    for line in reply.iter_lines():
        if line.startswith("data: "):
            yield line[6:]


def _assert_ended_by_shutdown(events: list[str]) -> None:
    """The rest of a stream after the signal: maybe some text, then the error, then [DONE]."""
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])


def test_a_port_in_use_fails_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(missing)]
        done = subprocess.run(
            [*command, "--port", str(port)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    # Loading the model would have failed on the missing file: it was never attempted.
    assert str(missing) not in done.stderr


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(quant="int8", max_model_len=2048, max_num_seqs=8, kv_cache_mb=128)


def test_a_shutdown_ends_the_requests_in_flight_and_frees_their_blocks(llm: LLM):
    app = OpenAIServer(llm, "smollm2")
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "the server did not start")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    waiting: list[httpx.Response] = []
    whole = threading.Thread(
        target=lambda: waiting.append(
            httpx.post(url, json={"model": "smollm2", **LONG}, timeout=120)
        )
    )
    with httpx.stream(
        "POST", url, json={"model": "smollm2", "stream": True, **LONG}, timeout=120
    ) as reply:
        events = _data_lines(reply)
        assert "choices" in json.loads(next(events))
        whole.start()
        _wait_for(lambda: app.engine.num_active == 2, "the second request did not start")
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        _assert_ended_by_shutdown(list(events))
    whole.join(timeout=60)
    assert waiting[0].status_code == 503
    assert waiting[0].json()["error"]["type"] == "server_error"
    thread.join(timeout=60)
    assert not thread.is_alive() and not app.engine._thread.is_alive()
    assert llm.engine_loop.cache.usage()[1] == 0  # every KV block is free again
    assert app.engine.num_active == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_with_a_stream_in_flight_exits_cleanly(sig: signal.Signals):
    command = [sys.executable, "-m", "engine.cli", "serve", "--quant", "int8", "--port", "0"]
    command += ["--max-model-len", "2048", "--kv-cache-mb", "128"]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        log, serving = [], None
        for line in proc.stderr:  # ends if the process dies
            log.append(line)
            serving = re.search(r"serving (\S+) on (http://\S+/v1)", line)
            if serving:
                break
        assert serving, "".join(log)
        model, base = serving.groups()
        body = {"model": model, "stream": True, **LONG}
        with httpx.stream("POST", f"{base}/completions", json=body, timeout=120) as reply:
            events = _data_lines(reply)
            assert "choices" in json.loads(next(events))
            start = time.monotonic()
            proc.send_signal(sig)
            _assert_ended_by_shutdown(list(events))
        _, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\n{sig.name}: exited {elapsed:.2f} s after the signal")
    stderr = "".join(log) + rest
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception" not in stderr
