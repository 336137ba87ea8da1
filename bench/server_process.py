"""`python serve.py` as its own process on a free loopback port, for the benches and the tests that need a
real server process (SIGKILL, load). Only the standard library and the project: importable from anywhere."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from multimodal_rec.config import PROJECT_ROOT


def start_server(artifacts: Path, index: str | None, log_dir: Path, env: dict | None = None,
                 extra: tuple = (), max_in_flight: int | None = 0) -> tuple[subprocess.Popen, str]:
    """(the process, its base URL) once /readyz answers; its stderr goes to `log_dir`/server.log.
    max_in_flight: load shedding (0, the default here: none, so that load benchmarks see the whole queue;
    None: serve.yaml's setting)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, str(PROJECT_ROOT / "serve.py"), f"artifacts={artifacts}", f"port={port}",
               f"hydra.run.dir={log_dir}", "log_level=warning", *extra]
    if index:
        command.append(f"index_name={index}")
    if max_in_flight is not None:
        command.append(f"max_in_flight={max_in_flight}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_dir / "server.log", "w") as log:  # the child keeps its own copy of the handle
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {(log_dir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("server did not become ready in 10 minutes")
