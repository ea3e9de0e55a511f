"""Load test for a running app: ``python -m dalle_space.loadtest [URL] --users 8 --requests 5 --pid PID``.

N concurrent gradio_client users each send M requests of mixed shapes (1-2 prompts, 1-2 images per
prompt) and samplers to ``/generate``, round after round, and it prints per round: successes, p50/p95
latency, the wait (latency minus the engine's own time: queue, engine lock and transfer), how many
requests compiled a new shape (the timings' ``compiled`` flag), and the server's resident memory before
and after (``--pid``: read from /proc/PID/status). A second round of the same shapes should compile
nothing and leave the memory where the first left it.

gradio_client is a development dependency (requirements-dev.txt), not one the Space needs, so it is
imported inside ``run`` rather than at the top. Only loopback addresses are accepted: this is for one's
own app on this machine, never a shared Space. Every request has a time limit and the count is fixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

PROMPTS = ["a red bicycle", "a lighthouse at night", "an avocado armchair", "snowy mountains at sunset"]
SAMPLERS = ["parallel", "serial", "compare"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    user: int
    index: int
    prompts: int
    images_per_prompt: int
    sampler: str
    latency_s: float
    engine_s: float  # sum of the returned timings' total_s (0 on failure)
    compiled: bool
    error: str | None  # None when the images came back


@dataclasses.dataclass(frozen=True)
class Round:
    outcomes: list[Outcome]
    wall_s: float
    rss_before_kib: int | None
    rss_after_kib: int | None

    @property
    def successes(self) -> int:
        return sum(o.error is None for o in self.outcomes)

    @property
    def recompiles(self) -> int:
        return sum(o.compiled for o in self.outcomes)

    def percentile(self, field: str, q: float) -> float:
        values = sorted(getattr(o, field) if field != "wait_s" else o.latency_s - o.engine_s
                        for o in self.outcomes if o.error is None)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def summary(self) -> str:
        rss = ""
        if self.rss_before_kib is not None and self.rss_after_kib is not None:
            rss = f"; server RSS {self.rss_before_kib / 1024:.0f} -> {self.rss_after_kib / 1024:.0f} MiB"
        return (f"{self.successes}/{len(self.outcomes)} succeeded in {self.wall_s:.1f} s; latency p50 "
                f"{self.percentile('latency_s', 0.5):.2f} s, p95 {self.percentile('latency_s', 0.95):.2f} s; "
                f"wait p50 {self.percentile('wait_s', 0.5):.2f} s, p95 {self.percentile('wait_s', 0.95):.2f} s; "
                f"{self.recompiles} compiled{rss}")


def rss_kib(pid: int | None) -> int | None:
    """VmRSS of a local process in KiB, or None without a pid."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"process {pid} reports no VmRSS")


def check_local(url: str) -> None:
    """Refuse anything but a loopback address: a load test is for one's own app on this machine."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {host!r}: {error}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{url} is not on this machine; the load test only targets loopback addresses.")


def request_shape(rng: random.Random) -> tuple[int, int, str]:
    """(prompts, images per prompt, sampler) of one request."""
    return rng.randint(1, 2), rng.randint(1, 2), rng.choice(SAMPLERS)


def run(url: str, users: int, requests: int, rounds: int = 1, pid: int | None = None, seed: int = 0,
        request_timeout_s: float = 300.0, log=print) -> list[Round]:
    """Run the rounds and return what each request got; every round repeats the first round's shapes."""
    from gradio_client import Client  # development dependency: see the module docstring

    check_local(url)
    try:
        clients = [Client(url, verbose=False) for _ in range(users)]
    except Exception as exc:  # noqa: BLE001 - gradio_client raises httpx's and its own errors
        raise ConnectionError(f"cannot reach {url}: {exc}") from None
    rng = random.Random(seed)
    plan = [[request_shape(rng) for _ in range(requests)] for _ in range(users)]
    lock = threading.Lock()

    def user(number: int) -> list[Outcome]:
        outcomes = []
        for index, (n_prompts, n_seeds, sampler) in enumerate(plan[number]):
            prompt = "\n".join(PROMPTS[(number + index + k) % len(PROMPTS)] for k in range(n_prompts))
            start = time.perf_counter()
            error, engine_s, compiled = None, 0.0, False
            try:
                job = clients[number].submit(
                    prompt=prompt, condition_scale=10, n_seeds=n_seeds, sampler=sampler,
                    seed=1000 * number + index, randomize_seed=False, top_k=50, top_p=1.0, temperature=1.0,
                    api_name="/generate")
                images, info = job.result(timeout=request_timeout_s)
                if len(images) != n_prompts * n_seeds:
                    error = f"{len(images)} images for {n_prompts} x {n_seeds}"
                engine_s = sum(t["total_s"] for t in info["timings"].values())
                compiled = any(t["compiled"] for t in info["timings"].values())
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown, not raised
                error = f"{type(exc).__name__}: {exc}"
            outcome = Outcome(number, index, n_prompts, n_seeds, sampler, time.perf_counter() - start, engine_s,
                              compiled, error)
            if error:
                with lock:
                    log(f"  user {number} request {index} failed: {error}")
            outcomes.append(outcome)
        return outcomes

    results = []
    for number in range(rounds):
        before = rss_kib(pid)
        start = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            outcomes = [o for batch in pool.map(user, range(users)) for o in batch]
        result = Round(outcomes, time.perf_counter() - start, before, rss_kib(pid))
        log(f"round {number + 1}: {result.summary()}")
        results.append(result)
    for client in clients:
        client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:7860/", help="the running app (loopback only)")
    parser.add_argument("--users", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=5, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the same requests")
    parser.add_argument("--pid", type=int, help="the server's process id, to report its RSS")
    parser.add_argument("--seed", type=int, default=0, help="picks the request shapes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    args = parser.parse_args(argv)
    if not (1 <= args.users <= 64 and 1 <= args.requests <= 100 and 1 <= args.rounds <= 10):
        parser.error("keep it bounded: 1-64 users, 1-100 requests each, 1-10 rounds")
    try:
        rounds = run(args.url, args.users, args.requests, args.rounds, args.pid, args.seed, args.timeout)
    except (ValueError, ConnectionError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    last = rounds[-1]
    if len(rounds) > 1 and rounds[0].rss_after_kib and last.rss_after_kib:
        change = last.rss_after_kib / rounds[0].rss_after_kib - 1
        print(f"RSS after the last round is {change:+.1%} against after the first.")
    return 0 if all(r.successes == len(r.outcomes) for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
