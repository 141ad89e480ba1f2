"""How close are `sftflow plan`'s predictions to reality? Run by hand (it trains SmolLM2 for a few steps):

    python benchmarks/plan_accuracy.py                       # the demo config at batch sizes 8 and 16
    python benchmarks/plan_accuracy.py --batch-sizes 4 8 --steps 3

For each batch size, in fresh processes (so neither sees the other's memory):
  1. `build_plan` predicts the peak memory of one step on the largest batch (batch x the longest example)
     and the seconds of that step (its FLOPs / the throughput the plan assumes);
  2. `measure_steps` trains 1 warm-up + `--steps` steps on exactly that batch, sampling the process RSS
     (GPU: max_memory_allocated) only inside the steps, not while the model loads.
On CPU, step times are CPU seconds per torch thread (the probe in the plan is timed the same way), so
other processes sharing the cores do not skew the comparison; the wall time is printed beside them.
Then prints predicted vs measured; the aim is memory within 25% and time within 50%. When the demo has
been run (`make demo`), the plan's whole-run time is also set against its train_runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "demo_sft.yaml"
GIB = 1024**3


def child(mode: str, batch: int, steps: int) -> dict:
    """Run in a fresh process: predict (mode plan) or measure (mode measure) at this batch size."""
    from sftflow.config import load_args
    from sftflow.tools.plan import build_plan, measure_steps

    overrides = [f"per_device_train_batch_size={batch}", "gradient_accumulation_steps=1"]
    args = load_args(CONFIG, overrides)
    if mode == "measure":
        return measure_steps(args, steps)
    plan = build_plan(args)
    seq = plan.largest_seq
    step_flops = batch * seq * plan.flops_per_token(seq)  # sftflow.train.perf, as the logged MFU counts
    m = plan.memory
    return {
        "peak_bytes": m.peak,
        "parts": {
            "weights": m.weights,
            "grads+optimizer": m.grads + m.optimizer,
            "activations": m.activations,
            "logits_extra": m.logits_extra,
            "runtime": m.runtime,
            "allocator": m.allocator,
        },
        "seq": seq,
        "step_seconds": step_flops / plan.flops_per_second,
        "flops_per_second": plan.flops_per_second,
        "throughput_source": plan.throughput_source,
        "run_seconds": plan.seconds,
        "steps": plan.steps,
        "device": plan.device.name,
    }


def run_child(mode: str, batch: int, steps: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(batch), str(steps)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{mode} at batch {batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        mode, batch, steps = opts.child
        print(json.dumps(child(mode, int(batch), int(steps))))
        return

    print(
        f"config: {CONFIG.relative_to(ROOT)}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'batch':>5} {'tokens':>9} | {'peak pred':>9} {'peak meas':>9} {'err':>5} | "
        f"{'step pred':>9} {'step meas':>9} {'err':>5} {'wall':>8} | {'GFLOP/s pred':>12} {'meas':>6}"
    )
    print(header)
    print("-" * len(header))
    plans = {}
    for batch in opts.batch_sizes:
        plan = run_child("plan", batch, opts.steps)
        meas = run_child("measure", batch, opts.steps)
        plans[batch] = plan
        print(
            f"{batch:>5} {batch:>3} x {plan['seq']:<3} | {plan['peak_bytes'] / GIB:>7.2f}Gi "
            f"{meas['peak_bytes'] / GIB:>7.2f}Gi {error(plan['peak_bytes'], meas['peak_bytes']):>5} | "
            f"{plan['step_seconds']:>8.2f}s {meas['busy_step_seconds']:>8.2f}s "
            f"{error(plan['step_seconds'], meas['busy_step_seconds']):>5} {meas['step_seconds']:>7.1f}s | "
            f"{plan['flops_per_second'] / 1e9:>12.1f} {meas['flops_per_second'] / 1e9:>6.1f}"
        )
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan["parts"].items())
        print(f"{'':>17}predicted GiB: {parts}; RSS before the first step {meas['baseline_bytes'] / GIB:.2f}")
    first = plans[opts.batch_sizes[0]]
    print(f"\ndevice: {first['device']}; throughput: {first['throughput_source']}")
    results = ROOT / "saves" / "smollm2-135m-instruct" / "lora" / "demo" / "all_results.json"
    if 8 in plans and results.is_file():
        runtime = json.loads(results.read_text()).get("train_runtime")
        if runtime:
            print(
                f"demo run (batch 8, {plans[8]['steps']} steps): predicted {plans[8]['run_seconds']:.0f} s, "
                f"train_runtime {runtime:.0f} s ({error(plans[8]['run_seconds'], runtime)}) [{results.relative_to(ROOT)}]"
            )


if __name__ == "__main__":
    main()
