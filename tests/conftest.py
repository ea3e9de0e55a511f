"""Shared fixtures: the app started the way the README says (``python app.py``), on a free local port, and
the tokens-only engine on the upstream fixture weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_LIMIT_S = 180  # generous: the first run ever also writes the bundled tiny checkpoint


@dataclass
class AppServer:
    url: str
    started_at: float  # time.monotonic() just before the process was spawned
    log: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(server: AppServer) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"app.py exited with code {server.process.returncode} before serving:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "config", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"app.py did not serve {server.url} within {STARTUP_LIMIT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def engine():
    """Tokens-only engine on the upstream fixture weights, at most 8 images (the fixture has no tokenizer
    files; the bundled tokenizer shares BART's special ids, which is all sample_tokens uses)."""
    from dalle_space import bundled, checkpoints, text
    from dalle_space.engine import Engine, ModelInfo

    config, params = checkpoints.load_dallebart(REPO / "tests" / "fixtures" / "dallebart-tiny")
    tokenizer = text.load_tokenizer(bundled.build_dallebart(bundled.cache_dir()))
    info = ModelInfo("dallebart-tiny fixture", None, "float32", "cpu")
    return Engine(config, params, tokenizer, None, None, None, info, max_images=8)


@pytest.fixture(scope="module")
def launch_app(tmp_path_factory):
    """Start ``python app.py`` with the bundled tiny model (unless overridden), offline, on 127.0.0.1.
    Every server started is stopped when the module's tests are done."""
    servers: list[AppServer] = []

    def launch(**env_overrides: str) -> AppServer:
        port = _free_port()
        env = {
            **os.environ,
            "DALLE_MODEL": "tiny",
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            **env_overrides,
        }
        log = tmp_path_factory.mktemp("app") / "app.log"
        started_at = time.monotonic()
        with log.open("w") as sink:
            process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=sink,
                                       stderr=subprocess.STDOUT)
        server = AppServer(f"http://127.0.0.1:{port}/", started_at, log, process)
        servers.append(server)
        _wait_until_serving(server)
        return server

    yield launch
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def app_server(launch_app) -> AppServer:
    """One tiny-model app per test module."""
    return launch_app()
