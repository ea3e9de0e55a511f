"""Load and faults against ``python app.py`` (tiny model, a queue of 2): the short load test, a client that
disconnects or cancels mid-request, a request that fails inside the engine, a full queue, and pictures that
would fill a long-running Space's disk.

The long form (8 users x 5 requests, two rounds, RSS) is run by hand: docs/reliability.md has the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import wait
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.utils import QueueError, Status

from dalle_space import loadtest

QUEUE_SIZE = 2
GOOD = dict(prompt="a red bicycle", condition_scale=10, n_seeds=1, sampler="parallel", seed=7,
            randomize_seed=False, top_k=50, top_p=1.0, temperature=1.0)
# The longest request the app takes on tiny: both samplers, 16 images.
BIG = dict(GOOD, prompt="a cat", n_seeds=16, sampler="compare")
SLACK_S = 10.0  # scheduling noise on a shared 2-core machine


@pytest.fixture(scope="module")
def server(launch_app):
    return launch_app(DALLE_QUEUE_SIZE=str(QUEUE_SIZE))


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


@pytest.fixture(scope="module")
def big_request_s(client) -> float:
    """Seconds the big request takes the first time, compilation included: more than any later one."""
    start = time.monotonic()
    images, _ = client.predict(**BIG, api_name="/generate")
    assert len(images) == 16
    return time.monotonic() - start


def test_short_load_test_serves_every_request(server, capsys):
    code = loadtest.main([server.url, "--users", "3", "--requests", "2", "--rounds", "1",
                          "--pid", str(server.process.pid), "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 1: 6/6 succeeded" in out
    assert "server RSS" in out


def test_load_test_refuses_other_hosts(capsys):
    assert loadtest.main(["http://10.1.2.3:7860/", "--users", "1", "--requests", "1"]) == 2
    assert "only targets loopback addresses" in capsys.readouterr().err


def wait_for_sampling(job, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while job.status().code != Status.PROGRESS:
        assert time.monotonic() < deadline, f"the job never started sampling: {job.status()}"
        time.sleep(0.02)


def seconds_to_serve_the_next_request(client) -> float:
    """How long a small request takes to come back, queue wait included; it must succeed."""
    start = time.monotonic()
    images, _ = client.predict(**GOOD, api_name="/generate")
    assert len(images) == 1
    return time.monotonic() - start


def test_a_client_that_disconnects_mid_request_does_not_wedge_the_queue(server, client, big_request_s):
    """The client process dies while its job samples: gradio closes the job's generator, its worker stops at
    the next chunk, and the next request waits at most for that, well under the big request's time."""
    child = (
        "import sys, time\n"
        "from gradio_client import Client\n"
        "from gradio_client.utils import Status\n"
        f"job = Client({server.url!r}, verbose=False).submit(**{BIG!r}, api_name='/generate')\n"
        "while job.status().code != Status.PROGRESS: time.sleep(0.02)\n"
        "print('sampling', flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "sampling"
    finally:
        process.kill()
        process.wait()
    waited = seconds_to_serve_the_next_request(client)
    print(f"\nnext request after a disconnect: {waited:.2f} s (the big request alone: {big_request_s:.2f} s)")
    assert waited < big_request_s + SLACK_S


def test_a_cancelled_request_frees_the_queue(client, big_request_s):
    """job.cancel(): gradio frees the queue slot at once; the next request runs as soon as the cancelled
    one's worker reaches its next chunk."""
    job = client.submit(**BIG, api_name="/generate")
    wait_for_sampling(job)
    job.cancel()
    waited = seconds_to_serve_the_next_request(client)
    print(f"\nnext request after a cancel: {waited:.2f} s")
    assert waited < big_request_s + SLACK_S
    deadline = time.monotonic() + 30
    while job.status().code != Status.CANCELLED:
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.05)


def test_a_request_that_fails_inside_the_engine_leaves_it_usable(server, client):
    """A lone surrogate passes the app's checks (gradio_client cannot even send one; raw JSON can) and is
    refused inside the engine, in the worker thread, under the engine lock, while other requests queue."""
    waiting = [client.submit(**dict(GOOD, seed=20 + i), api_name="/generate") for i in range(2)]
    body = json.dumps({"data": ["a \ud800 cat", 10, 1, "parallel", 0, False, 50, 1.0, 1.0]}).encode()
    post = urllib.request.Request(server.url + "gradio_api/call/generate", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/generate/{event_id}", timeout=120) as stream:
        events = stream.read().decode()
    assert '"error": "Prompt 1 is not valid text: it holds the lone surrogate U+D800."' in events
    for job in waiting:
        assert len(job.result(timeout=120)[0]) == 1
    _, summary = client.predict(**GOOD, api_name="/generate")
    assert summary["timings"]["parallel"]["compiled"] is False  # the compiled cache survived


def test_a_full_queue_refuses_at_once_with_gradios_message(client, big_request_s):
    blocker = client.submit(**BIG, api_name="/generate")
    wait_for_sampling(blocker)
    submitted = time.monotonic()
    jobs = [client.submit(**dict(GOOD, seed=100 + i), api_name="/generate") for i in range(QUEUE_SIZE + 3)]
    refused_after: list[float] = []
    for job in jobs:
        job.future.add_done_callback(lambda future: refused_after.append(time.monotonic() - submitted)
                                     if isinstance(future.exception(), QueueError) else None)
    wait([blocker.future, *(job.future for job in jobs)], timeout=big_request_s + 60)
    refused = [job for job in jobs if isinstance(job.exception(), QueueError)]
    served = [job for job in jobs if job.exception() is None]
    # The blocker runs, QUEUE_SIZE wait, the rest are turned away.
    assert (len(refused), len(served)) == (3, QUEUE_SIZE), [job.exception() for job in jobs]
    assert {str(job.exception()) for job in refused} == {"Queue is full! Please try again."}
    assert max(refused_after) < 10, "a refusal should come at once, not after a wait"
    assert len(blocker.result(timeout=60)[0]) == 16
    assert len(client.predict(**GOOD, api_name="/generate")[0]) == 1


def test_old_pictures_are_deleted_so_a_long_running_space_keeps_its_disk(launch_app, tmp_path):
    """gradio's own delete_cache never reaches gallery outputs; the app deletes its pictures once they are older
    than DALLE_KEEP_PICTURES_S, when it next draws."""
    server = launch_app(GRADIO_TEMP_DIR=str(tmp_path), DALLE_KEEP_PICTURES_S="4")
    client = Client(server.url, verbose=False)
    client.predict(**GOOD, api_name="/generate")
    first = set(tmp_path.rglob("*.png"))
    assert len(first) == 1, "one picture, one file on the server"
    time.sleep(5)
    images, _ = client.predict(**GOOD, api_name="/generate")
    second = set(tmp_path.rglob("*.png"))
    assert len(second) == 1 and not second & first
    assert Path(images[0]["image"]).name == next(iter(second)).name


@pytest.mark.parametrize("name, value, message", [
    ("DALLE_KEEP_PICTURES_S", "a day", "DALLE_KEEP_PICTURES_S must be a number of at least 1, not 'a day'."),
    ("DALLE_KEEP_PICTURES_S", "0", "DALLE_KEEP_PICTURES_S must be a number of at least 1, not '0'."),
    ("DALLE_QUEUE_SIZE", "2.5", "DALLE_QUEUE_SIZE must be a whole number of at least 1, not '2.5'."),
])
def test_a_bad_setting_stops_the_app_with_a_sentence(name, value, message):
    """A host's typo in the environment: the app says which setting and what it takes, before loading a model."""
    finished = subprocess.run([sys.executable, "app.py"], cwd=Path(__file__).resolve().parent.parent,
                              env={**os.environ, "DALLE_MODEL": "tiny", "HF_HUB_OFFLINE": "1", name: value},
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert finished.stderr.strip().endswith(message) and "Traceback" not in finished.stderr
