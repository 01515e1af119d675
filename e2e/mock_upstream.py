"""The e2e suite's upstream: the `llm-proxy-mock-upstream` binary (the `mock-upstream` crate), the
one mock of every provider (OpenAI, Azure, Google, Bedrock) that the Rust tests use too.

    with mock_upstream() as mock:
        ... connection --endpoint mock.url, the crate's test credentials ...
        mark = len(mock.requests())
        ...
        [call] = mock.requests()[mark:]

`requests()` is the mock's `GET /__mock/requests`: every request received, in order, as dicts
with method, path (raw, percent-encoded), query (None when absent), headers (lower-case names),
body (parsed as JSON when it is JSON, else the text), body_text (the text) and request_id (the
id the mock answered with, when its provider assigns one before answering: Bedrock's
x-amzn-RequestId). `clear()` forgets them."""

import contextlib
import json
import os
import selectors
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MOCK_BIN = Path(os.environ.get("MOCK_UPSTREAM_BIN", ROOT / "target" / "debug" / "llm-proxy-mock-upstream"))
START_PATIENCE_S = 30


class MockUpstream:
    """A running mock: its base URL and its recorded requests."""

    def __init__(self, url):
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=30)

    def requests(self):
        """Every request the mock received so far, bodies parsed as JSON where possible."""
        response = self._http.get("/__mock/requests")
        response.raise_for_status()
        requests = response.json()
        for request in requests:
            request["body_text"] = request["body"]
            try:
                request["body"] = json.loads(request["body"])
            except ValueError:
                pass
        return requests

    def clear(self):
        """Forgets the recorded requests."""
        self._http.delete("/__mock/requests").raise_for_status()

    def replay(self, request):
        """Sends a recorded request again, byte for byte (same method, path, query, headers and
        body), and returns the mock's answer: what the mock made of exactly that request (e.g.
        whether its signature verifies). The replay is recorded like any request."""
        target = request["path"] + (f"?{request['query']}" if request["query"] is not None else "")
        headers = [(name, value) for name, value in request["headers"].items() if name != "content-length"]
        return self._http.request(request["method"], target, headers=headers,
                                  content=request["body_text"].encode())

    def close(self):
        self._http.close()


def _read_first_line(process, deadline):
    """The first stdout line of `process`, waiting at most until `deadline`."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                raise AssertionError(f"{MOCK_BIN} did not say where it listens within {START_PATIENCE_S} s")
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                raise AssertionError(f"{MOCK_BIN} exited before listening (status {process.wait()})")
            line += chunk
    finally:
        selector.close()
    return line.decode().strip()


@contextlib.contextmanager
def mock_upstream(listen="127.0.0.1:0"):
    """Starts the mock on `listen` (a free port by default), yields a MockUpstream once it accepts
    connections, and stops it on the way out."""
    if not MOCK_BIN.exists():
        raise AssertionError(f"{MOCK_BIN} is missing: run `cargo build --bins` first")
    # stdout is read for the address line only; stderr goes to the test's own.
    process = subprocess.Popen([str(MOCK_BIN), listen], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    mock = None
    try:
        line = _read_first_line(process, time.monotonic() + START_PATIENCE_S)
        prefix = "listening on "
        assert line.startswith(prefix), f"{MOCK_BIN} said {line!r}, expected {prefix!r}URL"
        mock = MockUpstream(line[len(prefix):])
        yield mock
    finally:
        if mock is not None:
            mock.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
