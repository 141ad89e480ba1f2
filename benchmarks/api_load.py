"""Load test, side by side: `sftflow api` and `transformers serve --continuous-batching` on the same model
dir, at several concurrencies; prints requests/s, generated tokens/s, p50/p99 latency, errors and the
peak RSS of each server (its whole process tree).

One invocation starts each server in turn on a free port, waits for it, sends one warm-up request, runs
the levels, and stops it (run by hand; it is not a test):

    python benchmarks/api_load.py ~/.cache/sftflow/models/smollm2-135m-instruct
    python benchmarks/api_load.py MODEL_DIR --concurrency 1,4,16 --requests 32 --max-tokens 32
    python benchmarks/api_load.py MODEL_DIR --servers sftflow --sftflow-set onednn_linear=false

Every request is a chat completion with greedy decoding (temperature 0) and `max_tokens`; both servers
load the model in float32 on the CPU. The client is the standard library (urllib + threads), so it adds
little overhead. The request count per level is max(--requests, 2 x concurrency).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

QUESTIONS = [
    "What is your name?",
    "Who made you?",
    "Give me one tip for writing clear emails.",
    "What is the capital of France?",
    "Explain what a LoRA adapter is in one sentence.",
    "Name three fruits.",
    "How do I reverse a list in Python?",
    "What should I call you?",
]


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    outcomes: list[Outcome]

    def row(self) -> dict[str, float | int | str]:
        good = [o for o in self.outcomes if o.ok]
        latencies = [o.latency_s for o in good] or [float("nan")]
        tokens = sum(o.completion_tokens for o in good)
        return {
            "server": self.server,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "requests_per_s": len(good) / self.wall_s,
            "tokens_per_s": tokens / self.wall_s,
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "errors": len(self.outcomes) - len(good),
        }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, model: str, index: int, max_tokens: int) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            data = json.loads(response.read())
        return Outcome(True, time.perf_counter() - start, data["usage"]["completion_tokens"])
    except urllib.error.HTTPError as exc:
        return Outcome(False, time.perf_counter() - start, error=f"HTTP {exc.code}: {exc.read()[:200]!r}")
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return Outcome(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


class RssSampler:
    """Peak resident memory of a process and its children, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def server_command(name: str, model_dir: str, port: int, overrides: list[str]) -> tuple[list[str], str]:
    """The command that starts `name` on `port`, and the model name its requests use."""
    if name == "sftflow":
        sftflow = shutil.which("sftflow") or str(Path(sys.executable).with_name("sftflow"))
        command = [sftflow, "api", "--model", model_dir, "--port", str(port), "dtype=float32"]
        return [*command, *overrides], "sftflow"
    cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    command = [cli, "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    return [*command, "--port", str(port), "--host", "127.0.0.1"], model_dir


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def run_server(name: str, ns: argparse.Namespace, levels: list[int]) -> tuple[list[Level], int, float]:
    port = free_port()
    command, model = server_command(name, ns.model_dir, port, ns.sftflow_set)
    url = f"http://127.0.0.1:{port}/v1"
    log = open(Path(ns.log_dir) / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "API_KEY": ""})
    sampler = RssSampler(proc.pid)
    start = time.perf_counter()
    try:
        wait_ready(url, proc)
        warm = one_request(url, model, 0, 4)  # loads the model (transformers serve) and warms up
        if not warm.ok:
            raise RuntimeError(f"{name}: warm-up failed: {warm.error}")
        ready_s = time.perf_counter() - start
        results = []
        for concurrency in levels:
            count = max(ns.requests, 2 * concurrency)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                outcomes = list(pool.map(lambda i: one_request(url, model, i, ns.max_tokens), range(count)))
            results.append(Level(name, concurrency, count, time.perf_counter() - t0, outcomes))
            row = results[-1].row()
            print(
                f"  {name} c={concurrency}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_s']:.2f} s, "
                f"errors {row['errors']}",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        peak = sampler.stop()
        log.close()
    return results, peak, ready_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", help="a Hugging Face model dir both servers load")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per level (at least 2 x concurrency)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--servers", default="sftflow,transformers", help="which servers, in order")
    parser.add_argument("--log-dir", default=".", help="where the servers' logs go (NAME.log)")
    parser.add_argument(
        "--sftflow-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for sftflow api (repeatable), e.g. onednn_linear=false",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    ns = parser.parse_args()
    levels = [int(c) for c in ns.concurrency.split(",")]
    load = os.getloadavg()
    print(f"model {ns.model_dir}, {os.cpu_count()} CPUs, load average {load[0]:.2f} at start", flush=True)

    rows, peaks = [], {}
    for name in ns.servers.split(","):
        results, peak, ready_s = run_server(name, ns, levels)
        peaks[name] = peak
        for level in results:
            rows.append({**level.row(), "peak_rss_mb": peak / 2**20, "ready_s": ready_s})
        for level in results:
            for outcome in [o for o in level.outcomes if not o.ok][:3]:
                print(f"  {name} error: {outcome.error}")

    header = (
        "| server | concurrency | requests | requests/s | tokens/s | p50 s | p99 s | errors | peak RSS MB |"
    )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {ns.max_tokens} tokens per answer, greedy\n")
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    names = ns.servers.split(",")
    if len(names) == 2:
        print()
        for concurrency in levels:
            a, b = (
                next(r for r in rows if r["server"] == n and r["concurrency"] == concurrency) for n in names
            )
            ratio = a["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("inf")
            print(f"c={concurrency}: {names[0]} / {names[1]} requests/s = {ratio:.2f}x")
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
