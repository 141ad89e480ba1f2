"""Load test for `sftflow api`: N chat requests at a fixed concurrency; prints requests/s, latency
percentiles, generated tokens/s and errors.

Start a server first, then run this against it (run by hand; it is not a test):

    sftflow api saves/smollm2-135m-instruct/lora/demo --port 8000 &
    python benchmarks/api_load.py --url http://127.0.0.1:8000/v1 --concurrency 16 --requests 64
    python benchmarks/api_load.py --url http://127.0.0.1:8000/v1 --concurrency 16 --requests 64 --stream

Uses only the standard library (urllib + threads), so the client adds little overhead. API_KEY is sent
as a Bearer token when set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    first_token_s: float | None = None
    completion_tokens: int = 0
    error: str = ""


def one_request(url: str, index: int, max_tokens: int, stream: bool, api_key: str | None) -> Outcome:
    body = {
        "model": "sftflow",
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(), headers)
    start = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            if not stream:
                data = json.loads(response.read())
                return Outcome(True, time.perf_counter() - start, None, data["usage"]["completion_tokens"])
            tokens = 0
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return Outcome(False, time.perf_counter() - start, error=chunk["error"]["message"])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            return Outcome(True, time.perf_counter() - start, first, tokens)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return Outcome(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--stream", action="store_true", help="use stream: true (also reports time to first token)"
    )
    ns = parser.parse_args()
    api_key = os.environ.get("API_KEY")

    one_request(ns.url, 0, 4, False, api_key)  # warm-up, not counted
    start = time.perf_counter()
    with ThreadPoolExecutor(ns.concurrency) as pool:
        outcomes = list(
            pool.map(lambda i: one_request(ns.url, i, ns.max_tokens, ns.stream, api_key), range(ns.requests))
        )
    wall = time.perf_counter() - start

    good = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if not o.ok]
    latencies = [o.latency_s for o in good]
    tokens = sum(o.completion_tokens for o in good)
    mode = "stream" if ns.stream else "plain"
    print(
        f"{ns.requests} requests ({mode}, max_tokens={ns.max_tokens}) at concurrency {ns.concurrency} "
        f"against {ns.url}"
    )
    print(f"  wall time        : {wall:.1f} s")
    print(f"  requests/s       : {len(good) / wall:.2f}")
    if latencies:
        print(f"  latency p50      : {percentile(latencies, 50):.2f} s")
        print(f"  latency p99      : {percentile(latencies, 99):.2f} s")
        print(f"  latency mean/max : {statistics.mean(latencies):.2f} / {max(latencies):.2f} s")
    first = [o.first_token_s for o in good if o.first_token_s is not None]
    if first:
        print(f"  first token p50  : {percentile(first, 50):.2f} s (p99 {percentile(first, 99):.2f} s)")
    print(f"  generated tokens : {tokens} ({tokens / wall:.1f} tokens/s)")
    print(f"  errors           : {len(errors)}")
    for outcome in errors[:5]:
        print(f"    {outcome.error}")


if __name__ == "__main__":
    main()
