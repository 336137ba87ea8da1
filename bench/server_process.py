"""`python serve.py` as its own process on a free loopback port, for the benches and the tests that need a
real server process (SIGKILL, load). Only the standard library and the project: importable from anywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from multimodal_rec.config import PROJECT_ROOT


def start_server(artifacts: Path, index: str | None, log_dir: Path, env: dict | None = None,
                 extra: tuple = (), max_in_flight: int | None = 0,
                 root: Path | None = None, launcher: tuple = ()) -> tuple[subprocess.Popen, str]:
    """(the process, its base URL) once /readyz answers; its stderr goes to `log_dir`/server.log.
    max_in_flight: load shedding (0, the default here: none, so that load benchmarks see the whole queue;
    None: serve.yaml's setting). root: another checkout of the project to serve with (its serve.py and package,
    e.g. `git worktree add /tmp/before HEAD` to measure before and after side by side); default this one.
    launcher: a script (and its arguments) that runs serve.py, given as the next argument (a profiler)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    project = Path(root).resolve() if root is not None else PROJECT_ROOT
    command = [sys.executable, *launcher, str(project / "serve.py"), f"artifacts={artifacts}", f"port={port}",
               f"hydra.run.dir={log_dir}", "log_level=warning", *extra]
    if index:
        command.append(f"index_name={index}")
    if max_in_flight is not None:
        command.append(f"max_in_flight={max_in_flight}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if root is not None:  # its package before the one installed (editable) from this checkout
        env["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [env.get("PYTHONPATH")])])
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


# Stages timed inside the server (exclusive time: a stage's own, less the stages it calls), by wrapping what both
# the code before this change and after it have; "HTTP, FastAPI, parsing" is the rest of the server's CPU time.
STAGES = ("history encoder", "index search", "ranker", "reasons", "attributes", "ids, history, filters, rest",
          "JSON answer")


def profiled_server(out: str, serve_py: str, *arguments: str) -> None:
    """Runs serve.py with the stages timed, writing {stage: seconds}, the requests and the CPU seconds between the
    first request and the last to `out` as it goes."""
    import runpy
    import threading

    from starlette.responses import JSONResponse

    from multimodal_rec.indexing.item_index import ItemIndex
    from multimodal_rec.models.components.history_encoder import HistoryEncoder
    from multimodal_rec.models.components.ranker import Ranker
    from multimodal_rec.serving import artifacts, engine, service

    totals, stack, seen = dict.fromkeys(STAGES, 0.0), [], {"requests": 0, "first": None, "last": None}

    def timed(stage: str, function, counts: bool = False):
        def run(*args, **kwargs):
            if counts:
                seen["requests"] += 1
                seen["first"] = seen["first"] or time.process_time()
            started = time.perf_counter()
            stack.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                elapsed, inner = time.perf_counter() - started, stack.pop()
                totals[stage] += elapsed - inner
                if stack:
                    stack[-1] += elapsed
                seen["last"] = time.process_time()
        return run

    HistoryEncoder.forward = timed("history encoder", HistoryEncoder.forward)
    Ranker.forward = timed("ranker", Ranker.forward)
    for index in (artifacts.ExactIndex, ItemIndex):
        index.search = timed("index search", index.search)
    engine.reasons = timed("reasons", engine.reasons)
    for name in ("attributes", "attributes_of"):  # after / before
        if hasattr(engine, name):
            setattr(engine, name, timed("attributes", getattr(engine, name)))
    rest = "ids, history, filters, rest"
    cls = service.RecommenderService
    if hasattr(cls, "recommend_ask"):  # after: checked, then answered (together, with batching on)
        cls.recommend_ask, cls.rank_ask = timed(rest, cls.recommend_ask, True), timed(rest, cls.rank_ask, True)
        cls.answer = timed(rest, cls.answer)
    else:
        cls.recommend, cls.rank = timed(rest, cls.recommend, True), timed(rest, cls.rank, True)
    JSONResponse.render = timed("JSON answer", JSONResponse.render)

    def report() -> None:  # every half second: uvicorn ends the process by its signal, past atexit
        while True:
            time.sleep(0.5)
            cpu = (seen["last"] or 0.0) - (seen["first"] or 0.0)
            Path(f"{out}.part").write_text(json.dumps({"stages": totals, "requests": seen["requests"], "cpu": cpu}))
            os.replace(f"{out}.part", out)

    threading.Thread(target=report, daemon=True).start()
    sys.argv = [serve_py, *arguments]
    runpy.run_path(serve_py, run_name="__main__")


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--profiled-server":
    # `python bench/server_process.py --profiled-server <out.json> <serve.py> <overrides>`: here, not in the
    # bench, so that the package imported is the one PYTHONPATH names (another checkout's, for a baseline)
    profiled_server(*sys.argv[2:])
