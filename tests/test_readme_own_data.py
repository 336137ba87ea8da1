"""README "Your own data", followed as written in a fresh copy of the repository: the example shop's files, the
YAML the README shows, its four commands (the server on a free port instead of 8000) and its curl request."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from multimodal_rec.config import PROJECT_ROOT
from tests.conftest import free_port


def readme_section(title: str) -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def fenced(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each command line of a bash block, its trailing comment dropped."""
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line, comments=True) for line in lines]


def fresh_copy(target: Path) -> Path:
    """The repository's tracked files (as they are in the working tree), nothing generated or ignored."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot make a fresh copy of the tracked files")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = PROJECT_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def run(command: list[str], cwd: Path) -> None:
    assert command[0] == "python", command
    done = subprocess.run([sys.executable, *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_the_readme_takes_two_csv_files_to_a_served_endpoint(tmp_path):
    section = readme_section("Your own data")
    (config,) = fenced(section, "yaml")
    (block,) = fenced(section, "bash")
    clone = fresh_copy(tmp_path / "clone")
    config_path = config.splitlines()[0].lstrip("# ").strip()
    assert config_path == "conf/data/myshop.yaml"
    (clone / config_path).write_text(config)
    try_it = re.search(r"`(python -m multimodal_rec\.data\.sources\.example_shop out=\S+)`", section).group(1)
    run(shlex.split(try_it), clone)
    (clone / "myshop" / "customers.csv").unlink()  # "a shop needs two files"; the YAML reads no customers

    steps = commands(block)
    assert [s[0] for s in steps] == ["python"] * 4 + ["curl"]
    for step in steps[:3]:
        run(step, clone)
    port = free_port()
    server = subprocess.Popen([sys.executable, *steps[3][1:], f"port={port}"], cwd=clone, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            server.kill()
            pytest.fail(f"the server did not come up: {server.stderr.read()[-2000:]}")
        body = json.loads(steps[4][steps[4].index("-d") + 1])
        answer = httpx.post(f"{url}/recommend", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert len(items) == body["k"] and all(re.fullmatch(r"SKU-\d{6}", i["item_id"]) for i in items)
        assert body["history"][0] not in [i["item_id"] for i in items]
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "Shopping guide" in page.text
    finally:
        server.terminate()
        server.wait(30)
