"""What the SDK end-to-end tests share: `llmctl serve` on free local ports, its log in a file, the
`llmctl` admin commands against it, and the wait for the data plane to list the assigned aliases.

    with llmctl_serve(scratch_dir) as gateway:
        gateway.llmctl("vkey", "add", ...)
        gateway.wait_for_aliases(client, {"gpt-4"})

One deadline, PATIENCE_S from the start, bounds both the readiness wait and the alias wait."""

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = os.environ.get("LLMCTL_BIN", str(ROOT / "target" / "debug" / "llmctl"))
PATIENCE_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A running `llmctl serve`: its ports, its log and the shared deadline."""

    def __init__(self, api_port, grpc_port, metrics_port, log_path, deadline):
        self.api_port = api_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.deadline = deadline

    def llmctl(self, *args):
        """Runs `llmctl --server <this gateway's gRPC> ARGS...`; fails the test unless it succeeds."""
        out = subprocess.run([LLMCTL, "--server", f"http://127.0.0.1:{self.grpc_port}", *args],
                             capture_output=True, text=True, timeout=PATIENCE_S)
        assert out.returncode == 0, f"llmctl {args}: {out.stderr}"
        return out.stdout

    def wait_for_aliases(self, client, aliases):
        """Polls `client.models.list()` until it shows every alias (the data plane got the assignments)."""
        aliases = set(aliases)
        while aliases - {m.id for m in client.models.list()}:
            assert time.monotonic() < self.deadline, "the data plane never got the assignments"
            time.sleep(0.05)


@contextlib.contextmanager
def llmctl_serve(scratch_dir):
    """Starts `llmctl serve` with its data in SCRATCH_DIR/data and its output in SCRATCH_DIR/serve.log,
    waits for /readyz, yields a Gateway and terminates the server on the way out."""
    scratch_dir = Path(scratch_dir)
    api_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log_path = scratch_dir / "serve.log"
    # A file, not a pipe nobody reads: the gateway can never block on it.
    with open(log_path, "w") as log:
        serve = subprocess.Popen(
            [LLMCTL, "serve", "--data-dir", str(scratch_dir / "data"), "--listen", f"127.0.0.1:{api_port}",
             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
            stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + PATIENCE_S
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2)
                    break
                except OSError:
                    assert serve.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, "llmctl serve did not become ready"
                    time.sleep(0.1)
            yield Gateway(api_port, grpc_port, metrics_port, log_path, deadline)
        finally:
            serve.terminate()
            serve.wait(timeout=30)
