"""Batched prediction: `sftflow predict` at per_device_eval_batch_size 1 and 8 on the same model and
prompts; prints seconds, prompts/s and whether the answers match row for row (greedy decoding).

Run by hand (not a test), on the bundled model and the demo's held-out questions:

    .venv/bin/python benchmarks/predict_batches.py ~/.cache/sftflow/models/smollm2-135m-instruct
    .venv/bin/python benchmarks/predict_batches.py MODEL_DIR --adapter saves/.../demo --batch-sizes 1,4,8
    .venv/bin/python benchmarks/predict_batches.py MODEL_DIR --dataset wren_identity --limit 32

Each batch size runs as its own `sftflow predict` process (float32 on the CPU, or the GPU when there is
one). `command s` is the whole process (imports, model load, generation, metrics); `generate s` is the
Trainer's predict loop alone (predict_runtime) and `prompts/s` is computed from it. The load average is
printed before and after: on a shared machine it decides how far figures can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4")


def run_predict(cli: argparse.Namespace, batch_size: int, out: Path) -> float:
    """One `sftflow predict` process; returns its wall seconds."""
    argv = [sys.executable, "-m", "sftflow.cli", "predict", "--model", cli.model]
    if cli.adapter:
        argv += ["--adapter", cli.adapter]
    argv += [
        f"dataset_dir={cli.dataset_dir}",
        f"eval_dataset={cli.dataset}",
        f"max_new_tokens={cli.max_new_tokens}",
        f"per_device_eval_batch_size={batch_size}",
        f"output_dir={out}",
    ]
    if cli.limit:
        argv.append(f"max_samples={cli.limit}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"batch size {batch_size} failed:\n{proc.stderr[-3000:]}")
    return seconds


def read_rows(out: Path) -> list[dict]:
    lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model dir (or bundled name)")
    parser.add_argument("--adapter", help="a LoRA run dir to predict with")
    parser.add_argument("--dataset-dir", default=str(REPO / "data"))
    parser.add_argument("--dataset", default="wren_identity_heldout", help="a name in dataset_info.json")
    parser.add_argument("--limit", type=int, help="answer only the first N prompts (max_samples)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the demo's setting")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated; the first is the reference")
    cli = parser.parse_args()
    cli.model = str(Path(cli.model).expanduser()) if Path(cli.model).expanduser().exists() else cli.model
    sizes = [int(s) for s in cli.batch_sizes.split(",")]

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            out = Path(tmp) / f"batch{size}"
            seconds = run_predict(cli, size, out)
            metrics = json.loads((out / "predict_results.json").read_text())
            results.append((size, seconds, metrics, read_rows(out)))
            print(f"  batch {size} done in {seconds:.1f} s", flush=True)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    _, _, ref_metrics, ref_rows = results[0]
    print(f"\n{len(ref_rows)} prompts from {cli.dataset}, max_new_tokens {cli.max_new_tokens}, greedy")
    print(
        f"{'batch':>5} {'command s':>10} {'generate s':>11} {'prompts/s':>10} {'speedup':>8}  answers vs batch {sizes[0]}"
    )
    ref_generate = ref_metrics["predict_runtime"]
    for size, seconds, metrics, rows in results:
        generate = metrics["predict_runtime"]
        same = sum(a == b for a, b in zip(rows, ref_rows, strict=True))
        equal_metrics = all(metrics[k] == ref_metrics[k] for k in METRICS)
        verdict = f"{same}/{len(rows)} rows equal, metrics {'equal' if equal_metrics else 'DIFFER'}"
        print(
            f"{size:>5} {seconds:>10.1f} {generate:>11.1f} {len(rows) / generate:>10.2f} "
            f"{ref_generate / generate:>7.2f}x  {verdict}"
        )
        for i, (a, b) in enumerate(zip(rows, ref_rows, strict=True)):
            if a != b:
                print(f"      first difference, row {i}:\n        {b['predict']!r}\n        {a['predict']!r}")
                break
    print(
        "\ntext metrics (batch " + str(sizes[0]) + "): " + ", ".join(f"{k} {ref_metrics[k]}" for k in METRICS)
    )


if __name__ == "__main__":
    main()
