"""Shared fixtures: the app started the way the README says (``python app.py``), on a free local port (one
default app and one fallback app for the whole session, others per module), one headless browser, the
tokens-only engine on the upstream fixture weights, and the bundled tiny model with random DalleBart weights."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_fake_secret_123"  # in the fallback app's environment: it must show nowhere
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SESSION_SERVERS = {"app_server", "fallback_server", "browser"}  # started once per test process
STARTUP_LIMIT_S = 180  # generous: the first run ever compiles every sampler with no cache


@dataclass
class FirstRequest:
    client: object  # gradio_client.Client
    images: list
    summary: dict
    seconds_since_spawn: float


@dataclass
class AppServer:
    url: str
    started_at: float  # time.monotonic() just before the process was spawned
    log: Path
    process: subprocess.Popen
    env: dict[str, str]
    first_request: FirstRequest | None = None

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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    """pytest-xdist hands out whole test files (module fixtures are costly to make twice), and every file that
    uses a session server goes to the same process, so each server starts once."""
    sharing = {item.module.__name__ for item in items if SESSION_SERVERS & set(item.fixturenames)}
    for item in items:
        name = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("session-servers" if name in sharing else name))


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
    tokenizer = text.load_tokenizer(bundled.DALLEBART)
    info = ModelInfo("dallebart-tiny fixture", None, "float32", "cpu")
    return Engine(config, params, tokenizer, None, None, None, info, max_images=8)


@pytest.fixture(scope="session")
def tiny():
    """The bundled tiny model's engine as the app starts it (default shape compiled), for the engine's own
    checks; a module that counts compilations or sweeps shapes loads its own."""
    from dalle_space.engine import Engine

    engine = Engine.from_pretrained("tiny")
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def untrained_tiny(tmp_path_factory) -> Path:
    """The bundled tiny DalleBart folder with random weights in place of the trained ones, for tests of what each
    sampling option changes: the trained model is too sure of most tokens for top-k, top-p or temperature to
    move them, random weights spread every step over the whole image vocabulary. It pairs with the bundled VQGAN."""
    import jax
    import numpy as np
    from flax.serialization import msgpack_serialize

    from dalle_space import bundled, dallebart
    from dalle_space.config import DALLEBART_PRESETS

    folder = Path(shutil.copytree(bundled.DALLEBART, tmp_path_factory.mktemp("untrained") / "dallebart"))
    params = jax.tree_util.tree_map(np.asarray, dallebart.init_params(DALLEBART_PRESETS["tiny"], 0))
    (folder / "flax_model.msgpack").write_bytes(msgpack_serialize(params))
    return folder


def _spawn(folder: Path, **env_overrides: str) -> AppServer:
    """``python app.py`` with the bundled tiny model (unless overridden), offline, on 127.0.0.1, serving."""
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
    log = folder / "app.log"
    started_at = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", started_at, log, process, env)
    try:
        _wait_until_serving(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def launch_app(tmp_path_factory):
    """Start an app with its own settings (``launch(NAME=value, ...)``); each is stopped when the module ends.
    Tests that only need the default app share ``app_server``: every start costs seconds."""
    servers: list[AppServer] = []

    def launch(**env_overrides: str) -> AppServer:
        servers.append(_spawn(tmp_path_factory.mktemp("app"), **env_overrides))
        return servers[-1]

    yield launch
    for server in servers:
        server.stop()


# The very first request the shared app serves, timed from the process's spawn (the cold-start test); top-k left
# to the page's default (the model's), as a person who never opens "Advanced" sends it.
FIRST_REQUEST = dict(prompt="a red bicycle", condition_scale=10, n_seeds=1, sampler="parallel", seed=7,
                     randomize_seed=False, top_p=1.0, temperature=1.0)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory) -> Iterator[AppServer]:
    """The default tiny-model app, shared by every module that needs nothing else; it has served
    FIRST_REQUEST before any test sees it."""
    from gradio_client import Client

    server = _spawn(tmp_path_factory.mktemp("app"))
    try:
        client = Client(server.url, verbose=False)
        images, summary = client.predict(**FIRST_REQUEST, api_name="/generate")
        server.first_request = FirstRequest(client, images, summary, time.monotonic() - server.started_at)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fallback_server(tmp_path_factory) -> Iterator[AppServer]:
    """An app asked for 'mini' with no hub and an empty cache, so it falls back to tiny; with a token in its
    environment, a share link asked for, its own gradio temp folder, and an ``nvidia-smi`` on its PATH (a
    machine that shows an NVIDIA GPU while JAX runs on the CPU)."""
    folder = tmp_path_factory.mktemp("fallback-app")
    fake_bin = folder / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    (folder / "gradio-temp").mkdir()
    server = _spawn(folder, DALLE_MODEL="mini", HF_HOME=str(folder / "empty-hf-home"), HF_TOKEN=FAKE_TOKEN,
                    GRADIO_SHARE="True", GRADIO_TEMP_DIR=str(folder / "gradio-temp"),
                    PATH=f"{fake_bin}:{os.environ['PATH']}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """Debian's headless chromium driven by Playwright, shared by every browser test."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the playwright Python package (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
