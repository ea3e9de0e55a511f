"""The hub download path for real: huggingface_hub talking HTTP to a local stand-in of the hub
(tests/hub_server.py) that serves the bundled tiny checkpoints under the published repo ids.

Each scenario runs in a fresh interpreter configured the way a user configures the app, through the
environment: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import.
Every proxy variable points at a closed local port and only 127.0.0.1 is exempt, so a request meant for
anywhere else fails instead of reaching the internet.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dalle_space import bundled, checkpoints
from hub_server import Hub, fake_commit

REPO = Path(__file__).resolve().parent.parent
MINI = checkpoints.DALLEBART_HUB["mini"][0]
VQGAN, VQGAN_COMMIT = checkpoints.VQGAN_HUB["f16_16384"]
MINI_MAIN, MINI_OLD = fake_commit("mini main"), fake_commit("mini old")
# Served beside the checkpoint files; none of them may ever be requested.
EXTRAS = {"pytorch_model.bin": bytes(8 << 20), "README.md": b"# a model card\n", ".gitattributes": b"*.bin lfs\n",
          "samples/cat.png": b"\x89PNG not really"}
DALLEBART_NEEDED = ("config.json", "flax_model.msgpack", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                    "tokenizer_config.json", "vocab.json")
CUT_AT = 50_000  # bytes of flax_model.msgpack sent before a cut


def _read(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def files() -> dict[str, dict[str, bytes]]:
    """The tiny DalleBart (its old commit asking for the text normaliser) and the tiny VQGAN."""
    dallebart = _read(bundled.DALLEBART)
    old_config = {**json.loads(dallebart["config.json"]), "normalize_text": True}
    return {"main": dallebart, "old": {**dallebart, "config.json": json.dumps(old_config).encode()},
            "vqgan": _read(bundled.VQGAN)}


def _hub(files) -> Hub:
    hub = Hub()
    hub.add(MINI, MINI_OLD, {**files["old"], **EXTRAS}, branch=None)
    hub.add(MINI, MINI_MAIN, {**files["main"], **EXTRAS})
    hub.add(VQGAN, VQGAN_COMMIT, {**files["vqgan"], **EXTRAS}, branch=None)
    hub.add(VQGAN, fake_commit("vqgan main"), {**files["vqgan"], **EXTRAS})  # newer, must not be fetched
    hub.add("someone/no-tokenizer", fake_commit("no tokenizer"),
            {name: files["main"][name] for name in ("config.json", "flax_model.msgpack")})
    return hub


@pytest.fixture
def hub(files):
    hub = _hub(files).start()
    yield hub
    hub.stop()


def run(code: str, endpoint: str, cache: Path, offline: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter against the hub at ``endpoint`` with the hub cache in ``cache``;
    ``attempt(call)`` there gives a call's value or its error, the ``result`` dict comes back."""
    env = {name: value for name, value in os.environ.items()
           if not name.upper().startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and "PROXY" not in name.upper()}
    dead_proxy = "http://127.0.0.1:9"
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cache.parent / "hf-home"), HF_HUB_CACHE=str(cache),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1",
               HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy, ALL_PROXY=dead_proxy, NO_PROXY="127.0.0.1",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    prelude = (
        "import json\n"
        "def attempt(call):\n"
        "    try:\n"
        "        return {'value': call()}\n"
        "    except Exception as error:\n"
        "        return {'error': type(error).__name__, 'message': str(error)}\n"
    )
    script = prelude + code + "\nprint('RESULT ' + json.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


# The "mini" served here is the tiny model, whose 256 codes would pair it with the bundled VQGAN: naming the
# real VQGAN keeps its hub download (at the pinned commit) in every scenario.
LOAD_ENGINE = """
from dalle_space import engine
loaded = engine.load_engine("mini", vqgan="f16_16384", **KWARGS)
result = {"model": loaded.info.model, "revision": loaded.info.revision, "notice": loaded.info.fallback_notice,
          "normalize_text": loaded.config.normalize_text, "resolution": loaded.resolution}
"""


def load_engine(endpoint: str, cache: Path, offline: bool = False, **kwargs) -> dict:
    """``engine.load_engine("mini", **kwargs)`` as the app calls it (with the hub's VQGAN), and what it reports."""
    return run(LOAD_ENGINE.replace("KWARGS", repr(kwargs)), endpoint, cache, offline)


def _snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _fetches(hub: Hub) -> collections.Counter:
    """(method, path) of every request but the storage ones, which are named by content."""
    return collections.Counter((r.method, r.path) for r in hub.requests if r.host == "hub")


def _expected_fetches(repo_id: str, commit: str, names, resolve: str | None = None) -> collections.Counter:
    requests = collections.Counter({("GET", f"/api/models/{repo_id}/tree/{commit}"): 1})
    if resolve is not None:
        requests[("GET", f"/api/models/{repo_id}/revision/{resolve}")] += 1
    for name in names:
        requests[("HEAD", f"/{repo_id}/resolve/{commit}/{name}")] += 1
        if not name.endswith(".msgpack"):  # checkpoints come from storage, by the 302's location
            requests[("GET", f"/{repo_id}/resolve/{commit}/{name}")] += 1
    return requests


@pytest.fixture(scope="module")
def downloaded(files, tmp_path_factory):
    """One load through the hub at its newest commit: what it reported, the requests, the cache it filled."""
    hub = _hub(files).start()
    cache = tmp_path_factory.mktemp("downloaded") / "hub"
    try:
        result = load_engine(hub.url, cache)
    finally:
        hub.stop()
    return result, hub, cache


def test_loads_through_the_hub_fetching_only_the_needed_files(downloaded, files):
    result, hub, cache = downloaded
    assert result == {"model": "mini", "revision": MINI_MAIN, "notice": None, "normalize_text": False,
                      "resolution": 64}
    assert _fetches(hub) == (_expected_fetches(MINI, MINI_MAIN, DALLEBART_NEEDED, resolve="main")
                             + _expected_fetches(VQGAN, VQGAN_COMMIT, ("config.json", "flax_model.msgpack")))
    assert sorted(r.path for r in hub.requests if r.host == "storage") == sorted(
        "/" + hashlib.sha256(content).hexdigest() for content in (files["main"]["flax_model.msgpack"],
                                                                  files["vqgan"]["flax_model.msgpack"]))
    assert not [r for r in hub.requests if any(name in r.path for name in EXTRAS)]
    assert _read(_snapshot(cache, MINI, MINI_MAIN)) == files["main"]
    assert _read(_snapshot(cache, VQGAN, VQGAN_COMMIT)) == files["vqgan"]


def test_pinned_revision_is_the_one_fetched_and_reported(hub, tmp_path):
    result = load_engine(hub.url, tmp_path / "hub", revision=MINI_OLD)
    assert (result["revision"], result["normalize_text"]) == (MINI_OLD, True)  # the old commit's config
    mini = collections.Counter({request: n for request, n in _fetches(hub).items() if MINI in request[1]})
    assert mini == _expected_fetches(MINI, MINI_OLD, DALLEBART_NEEDED)  # a commit needs no /revision/ request


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "online"])
def test_cache_serves_once_the_hub_is_gone(downloaded, tmp_path, offline):
    _, gone, cache = downloaded
    copy = shutil.copytree(cache, tmp_path / "hub", symlinks=True)
    result = load_engine(gone.url, copy, offline=offline)
    assert result == {"model": "mini", "revision": MINI_MAIN, "notice": None, "normalize_text": False,
                      "resolution": 64}


def test_cut_connection_is_retried_and_the_file_is_whole(hub, tmp_path, files):
    hub.cut(files["main"]["flax_model.msgpack"], after=CUT_AT)
    result = run(f"from dalle_space import checkpoints\n"
                 f"result = attempt(lambda: checkpoints.load_dallebart({MINI!r})[0].image_vocab_size)",
                 hub.url, tmp_path / "hub")
    assert result == {"value": 256}
    blob = "/" + hashlib.sha256(files["main"]["flax_model.msgpack"]).hexdigest()
    assert len([r for r in hub.requests if r.path == blob]) == 2  # cut, then fetched again
    assert _read(_snapshot(tmp_path / "hub", MINI, MINI_MAIN)) == files["main"]


def test_hub_dying_mid_download_falls_back_then_the_next_start_completes(hub, tmp_path, files):
    cache = tmp_path / "hub"
    hub.cut(files["main"]["flax_model.msgpack"], after=CUT_AT, die=True)
    result = load_engine(hub.url, cache)
    assert result["model"] == "tiny" and result["revision"] == "bundled"
    assert result["notice"] == ("The model 'mini' could not be downloaded, so the bundled tiny model runs instead: "
                                f"it draws only {bundled.DRAWS}.")  # the hub's own error goes to the log
    # no half file anywhere: not in the snapshot, not as a blob, not as a leftover download
    snapshot = _snapshot(cache, MINI, MINI_MAIN)
    kept = {path.name for path in snapshot.glob("*")}
    assert "flax_model.msgpack" not in kept
    blobs = {path.name for path in (cache / f"models--{MINI.replace('/', '--')}" / "blobs").glob("*")}
    assert hashlib.sha256(files["main"]["flax_model.msgpack"]).hexdigest() not in blobs
    assert not [path for path in cache.rglob("*") if path.name.endswith(".incomplete")]

    hub.requests.clear()
    hub.start()  # back, on another port
    result = load_engine(hub.url, cache)
    assert (result["model"], result["revision"], result["notice"]) == ("mini", MINI_MAIN, None)
    assert {path.rsplit("/", 1)[1] for method, path in _fetches(hub) if method == "HEAD" and MINI in path} == (
        set(DALLEBART_NEEDED) - kept)  # only what was missing is fetched again
    assert _read(snapshot) == files["main"]


MOVED_MAIN = """
import logging
from dalle_space import checkpoints, engine
logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("dalle_space.checkpoints").addHandler(handler)
result = {
    "unpinned": attempt(lambda: [str(part) for part in checkpoints.locate_dallebart("mini")]),
    "pinned": attempt(lambda: [str(part) for part in checkpoints.locate_dallebart("mini", revision=NEXT)]),
    "app": attempt(lambda: [engine.load_engine("mini", vqgan=None).info.revision]),
}
result["log"] = logged
"""


def test_main_moved_to_a_commit_cut_off_mid_download_runs_the_newest_complete_cached_commit(hub, tmp_path, files):
    cache = tmp_path / "hub"
    downloaded = run(f"from dalle_space import checkpoints\n"
                     f"result = [checkpoints.locate_dallebart('mini', revision={MINI_OLD!r})[1],"
                     f" checkpoints.locate_dallebart('mini')[1]]", hub.url, cache)
    assert downloaded == [MINI_OLD, MINI_MAIN]
    os.utime(_snapshot(cache, MINI, MINI_OLD), (1e9, 1e9))  # complete too, but older than main's
    mini_next = fake_commit("mini next")
    next_weights = files["main"]["flax_model.msgpack"] + b"next"  # new bytes: downloaded, not linked from a blob
    hub.add(MINI, mini_next, {**files["main"], "flax_model.msgpack": next_weights, **EXTRAS})  # main moves
    hub.cut(next_weights, after=CUT_AT, die=True)

    result = run(MOVED_MAIN.replace("NEXT", repr(mini_next)), hub.url, cache)
    assert (cache / f"models--{MINI.replace('/', '--')}" / "refs" / "main").read_text() == mini_next
    assert not (_snapshot(cache, MINI, mini_next) / "flax_model.msgpack").exists()  # the cut happened
    assert result["unpinned"] == {"value": [str(_snapshot(cache, MINI, MINI_MAIN)), MINI_MAIN]}
    assert _read(_snapshot(cache, MINI, MINI_MAIN)) == files["main"]  # whole
    assert result["app"] == {"value": [MINI_MAIN]}  # the commit the page shows is the one that runs
    assert result["pinned"].get("error") == "HubUnavailableError", result["pinned"]  # that commit or nothing
    assert result["pinned"]["message"].startswith(f"cannot download {MINI} from the hub at {hub.url} (")
    assert result["log"][0].endswith(f"the cached copy of main is incomplete or absent: an older cached copy is "
                                     f"used, commit {MINI_MAIN}.")


ERRORS = """
from dalle_space import checkpoints, engine
result = {
    "branch": attempt(lambda: checkpoints.locate_dallebart("mini", revision="no-such-branch")),
    "commit": attempt(lambda: checkpoints.locate_dallebart("mini", revision=NOWHERE)),
    "repo": attempt(lambda: checkpoints.locate_dallebart("dalle-mini/dalle-nano")),
    "bad id": attempt(lambda: checkpoints.locate_dallebart("dalle-mini/dalle mini")),
    "app": attempt(lambda: engine.load_engine("mini", revision="no-such-branch").info.model),
    "no tokenizer": attempt(lambda: engine.Engine.from_pretrained("someone/no-tokenizer", vqgan=None).info.model),
}
"""


def test_missing_revision_repo_or_files_are_clear_errors_not_an_outage(hub, tmp_path):
    nowhere = fake_commit("nowhere")
    result = run(ERRORS.replace("NOWHERE", repr(nowhere)), hub.url, tmp_path / "hub")
    at = f"on the hub at {hub.url}"
    assert result["branch"] == {"error": "CheckpointError",
                                "message": f"{MINI} has no revision 'no-such-branch' {at}"}
    assert result["commit"] == {"error": "CheckpointError", "message": f"{MINI} has no revision '{nowhere}' {at}"}
    assert result["repo"] == {"error": "CheckpointError",
                              "message": f"dalle-mini/dalle-nano is not a repository {at} (or it is private or gated)"}
    assert result["bad id"]["error"] == "CheckpointError"
    assert result["bad id"]["message"].startswith("'dalle-mini/dalle mini' is not a valid hub id (")
    assert result["app"] == result["branch"]  # the app stops with the reason instead of falling back
    folder = _snapshot(tmp_path / "hub", "someone/no-tokenizer", fake_commit("no tokenizer"))
    assert result["no tokenizer"] == {"error": "CheckpointError", "message": f"{folder} is not a complete DalleBart "
                                      "checkpoint: missing tokenizer.json or vocab.json + merges.txt"}
