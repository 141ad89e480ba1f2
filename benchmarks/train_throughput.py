"""Training throughput: sftflow at its defaults against TRL, the plain HF Trainer and LLaMA-Factory.

Every tool trains SmolLM2-135M-Instruct (the bundled copy) with LoRA r=8 (alpha 16, dropout 0) on
q_proj,v_proj, cutoff 256, batch 4, lr 1e-4, fp32, on the same first N rows of the alpaca demo
(../shared/reference-data/alpaca_en_demo.json), for N/4 steps, each in its own process (so peak RSS is
its own), one after another. Each keeps its own defaults otherwise (TRL and LLaMA-Factory: gradient
checkpointing on; HF Trainer: off), except bf16 -> fp32 (bf16 is unusable on this CPU) and
logging_steps 1 (to read the loss of the last step).

Run by hand (not a test):

    .venv/bin/python benchmarks/train_throughput.py --quick      # ~5 minutes on an idle 2-core CPU
    .venv/bin/python benchmarks/train_throughput.py --steps 24 --variants
    .venv/bin/python benchmarks/train_throughput.py --lf-python /tmp/lf-venv/bin/python   # + LLaMA-Factory

Figures: tokens/s counts non-pad tokens (each tool's `num_input_tokens_seen`, non_padding), from the
end of step 1 to the end of the last step (the first step's warm-up left out); s/step over the same
steps; peak RSS of the tool's process (resource.getrusage); loss at the last step and the mean train
loss over all steps (the same examples in every tool, batches drawn by each tool's own shuffle).
Also printed: preprocessing examples/s (sftflow, 999 rows, no cache) and `sftflow --help` start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference-data" / "alpaca_en_demo.json"
CUTOFF, BATCH, LR, RANK = 256, 4, 1e-4, 8
TARGETS = ["q_proj", "v_proj"]
SEED = 42


# ---------------------------------------------------------------- child side (one tool per process)


def timing_callback():
    """A TrainerCallback recording (time, tokens seen, loss) at every step."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timing()


def summarize(tool: str, timing, train_loss: float | None) -> dict:
    steps = timing.steps
    (t0, n0), (t1, n1) = steps[0], steps[-1]
    return {
        "tool": tool,
        "steps": len(steps),
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (len(steps) - 1),
        "tokens": n1,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "last_loss": timing.losses[-1] if timing.losses else float("nan"),
        "mean_loss": train_loss if train_loss is not None else sum(timing.losses) / len(timing.losses),
    }


def model_path() -> str:
    from sftflow.model.loader import resolve_model_path

    return str(resolve_model_path("smollm2-135m-instruct"))


def run_sftflow(data: Path, steps: int, out: Path, extra: list[str]) -> dict:
    from sftflow.config import load_args
    from sftflow.stages.sft import run_sft

    args = load_args(
        None,
        [
            f"model_name_or_path={model_path()}",
            f"dataset_dir={data.parent}",
            "dataset=bench",
            f"cutoff_len={CUTOFF}",
            f"lora_rank={RANK}",
            f"lora_target={','.join(TARGETS)}",
            f"per_device_train_batch_size={BATCH}",
            f"learning_rate={LR}",
            f"max_steps={steps}",
            f"seed={SEED}",
            "logging_steps=1",
            "do_train=true",
            "plot_loss=false",
            f"output_dir={out}",
            f"tokenized_cache_dir={out}/cache",
            *extra,
        ],
    )
    timing = timing_callback()
    result = run_sft(args, callbacks=[timing])
    return summarize(
        "sftflow" + (f" ({' '.join(extra)})" if extra else ""), timing, result.metrics.get("train_loss")
    )


def rows(data: Path) -> list[dict]:
    return json.loads(data.read_text(encoding="utf-8"))


def user_text(row: dict) -> str:
    return row["instruction"] + ("\n" + row["input"] if row.get("input") else "")


def run_trl(data: Path, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": user_text(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows(data)
        ]
    )
    config = SFTConfig(
        output_dir=str(out),
        max_length=CUTOFF,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=steps,
        seed=SEED,
        logging_steps=1,
        bf16=False,  # the one override: fp32 (bf16 is 30-100x slower on this CPU)
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    timing = timing_callback()
    trainer = SFTTrainer(
        model=model_path(), args=config, train_dataset=dataset, peft_config=lora, callbacks=[timing]
    )
    output = trainer.train()
    return summarize("TRL SFTTrainer", timing, output.metrics.get("train_loss"))


def run_hf(data: Path, steps: int, out: Path, end_at_eot: bool = False) -> dict:
    """The plain HF Trainer + PEFT. Its labels train everything after the prompt, which for SmolLM2's
    template includes the "\\n" after `<|im_end|>`; with `end_at_eot` each example stops at its
    `<|im_end|>` as sftflow's do, so the two losses are over the same tokens."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def ids(messages: list[dict], **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5

    def encode(row: dict) -> dict:
        messages = [{"role": "user", "content": user_text(row)}]
        prompt = ids(messages, add_generation_prompt=True)
        full = ids([*messages, {"role": "assistant", "content": row["output"]}])
        if end_at_eot:
            eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
            full = full[: len(full) - full[::-1].index(eot)]
        full = full[:CUTOFF]
        labels = [-100] * min(len(prompt), len(full)) + full[len(prompt) :]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    dataset = Dataset.from_list([encode(r) for r in rows(data)])
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=steps,
        seed=SEED,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        include_num_input_tokens_seen="non_padding",
    )
    timing = timing_callback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[timing],
    )
    output = trainer.train()
    name = "HF Trainer + PEFT" + (" (labels end at <|im_end|>)" if end_at_eot else "")
    return summarize(name, timing, output.metrics.get("train_loss"))


def run_llamafactory(data: Path, steps: int, out: Path, model: str) -> dict:
    from llamafactory.train.tuner import run_exp

    timing = timing_callback()
    run_exp(
        {
            "model_name_or_path": model,
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": RANK,
            "lora_target": ",".join(TARGETS),
            "dataset_dir": str(data.parent),
            "dataset": "bench",
            "template": "smollm2",
            "cutoff_len": CUTOFF,
            "per_device_train_batch_size": BATCH,
            "learning_rate": LR,
            "max_steps": steps,
            "seed": SEED,
            "logging_steps": 1,
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "report_to": "none",
            "save_strategy": "no",
            "plot_loss": False,
            "bf16": False,
            "use_cpu": True,
            "include_num_input_tokens_seen": "non_padding",
        },
        callbacks=[timing],
    )
    return summarize("LLaMA-Factory", timing, None)


def child(tool: str, data: Path, steps: int, out: Path, extra: list[str], model: str | None) -> None:
    if tool == "sftflow":
        result = run_sftflow(data, steps, out, extra)
    elif tool == "trl":
        result = run_trl(data, steps, out)
    elif tool in ("hf", "hf-eot"):
        result = run_hf(data, steps, out, end_at_eot=tool == "hf-eot")
    else:
        result = run_llamafactory(data, steps, out, model or "")
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side


def run_child(
    python: str, tool: str, data: Path, steps: int, work: Path, extra: list[str], env: dict
) -> dict | str:
    out = work / f"out-{tool}-{len(list(work.iterdir()))}"
    cmd = [python, __file__, "--child", tool, "--data", str(data), "--steps", str(steps), "--out", str(out)]
    cmd += ["--model", model_path()] + [f"--extra={e}" for e in extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return f"{tool} failed (rc {proc.returncode}):\n  " + "\n  ".join(tail)


def preprocessing_rate() -> float:
    """Examples/s for load + convert + tokenize of the 999-row demo (sftflow, no cache), best of 2."""
    from sftflow.config import load_args
    from sftflow.data.prepare import prepare
    from sftflow.model.loader import load_chat_tokenizer

    with tempfile.TemporaryDirectory() as out:
        args = load_args(
            None,
            [
                f"model_name_or_path={model_path()}",
                f"dataset_dir={REFERENCE.parent}",
                "dataset=alpaca_en_demo",
                f"cutoff_len={CUTOFF}",
                f"output_dir={out}",
                "do_train=true",
            ],
        )
        tokenizer = load_chat_tokenizer(args.model, args.data)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            prepared = prepare("sft", args.data, tokenizer, args.training.seed, use_cache=False)
            best = min(best, time.perf_counter() - start)
        return len(prepared.train) / best


def startup_time() -> float:
    exe = Path(sys.executable).parent / "sftflow"
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([str(exe), "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def limit_tokens_per_s() -> tuple[float, float, float, int]:
    """The 4N limit on this machine: (tokens/s, sustained matmul FLOP/s, best burst FLOP/s, N).

    The sustained rate is the median of 30 fp32 2048 x 2048 matmuls (`sftflow.train.perf.matmul_rates`,
    what a multi-second step sees; the MFU in training logs uses the same probe); the best single run is
    printed beside it (on this shared CPU it bursts ~20% higher). FLOPs per token are the logged MFU's
    and plan's (`perf.flops_per_token` for LoRA r=RANK on TARGETS) without attention: 4N + 6 per adapter
    parameter, N = the parameters in matmuls (block linears and the output head)."""
    import statistics

    from transformers import AutoConfig

    from sftflow.train.perf import ModelShape, TrainSetup, flops_per_token, matmul_rates

    rates = matmul_rates(size=(2048, 2048, 2048), runs=30)
    sustained, burst = statistics.median(rates), max(rates)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_path()))
    setup = TrainSetup("lora", frozenset(TARGETS), RANK)
    return sustained / flops_per_token(shape, setup, 0, False), sustained, burst, shape.matmul_params()


def table(results: list[dict], limit: float) -> str:
    def ratio_to(prefix: str, r: dict) -> str:
        peer = next((p["tokens_per_s"] for p in results if p["tool"].startswith(prefix)), None)
        return f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-"

    lines = [
        "| tool | tokens/s (non-pad) | of 4N limit | s/step | peak RSS (GB) | loss, last step | mean train loss "
        "| vs TRL | vs HF Trainer | vs LLaMA-Factory | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['tool']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / limit:.2f} | {r['s_per_step']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['last_loss']:.4f} | {r['mean_loss']:.4f} | {ratio_to('TRL', r)} | "
            f"{ratio_to('HF', r)} | {ratio_to('LLaMA', r)} | {r.get('load_avg_1m', 0):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 steps per tool (~5 minutes in all)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per tool (batch 4)")
    parser.add_argument("--tools", default="sftflow,trl,hf,llamafactory")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every tool this many times, interleaved; keep each tool's best",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also sftflow with fast_loss/packing/checkpointing, and the HF Trainer with labels ending at <|im_end|>",
    )
    parser.add_argument(
        "--lf-python", default="/tmp/h6/lf-venv/bin/python", help="python of a LLaMA-Factory venv"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        child(cli.child, cli.data, cli.steps, cli.out, cli.extra, cli.model)
        return

    sys.path.insert(0, str(ROOT / "src"))
    steps = 8 if cli.quick else cli.steps
    print(
        f"load average before: {os.getloadavg()}  (2 cores; > 2 means other work shares the CPU)", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="sftflow-bench-") as tmp:
        work = Path(tmp)
        data, peers_data = work / "data" / "bench.json", work / "peers" / "bench.json"
        picked = json.loads(REFERENCE.read_text(encoding="utf-8"))[: steps * BATCH]
        # sftflow shuffles its training set (datasets' shuffle, seed 42) before the Trainer's sampler; the
        # peers get the rows already in that order, so every tool sees the same batches at the same steps
        from datasets import Dataset

        for path, rows_ in ((data, picked), (peers_data, list(Dataset.from_list(picked).shuffle(seed=SEED)))):
            path.parent.mkdir()
            path.write_text(json.dumps(rows_))
            (path.parent / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
        runs: list[tuple[str, str, list[str]]] = []
        for tool in cli.tools.split(","):
            if tool == "llamafactory":
                if not Path(cli.lf_python).is_file():
                    print(f"LLaMA-Factory skipped: no venv at {cli.lf_python}", flush=True)
                    continue
                runs.append((cli.lf_python, tool, []))
            else:
                runs.append((sys.executable, tool, []))
        if cli.variants:
            for extra in (["fast_loss=false"], ["packing=true"], ["gradient_checkpointing=true"]):
                runs.append((sys.executable, "sftflow", extra))
            runs.append((sys.executable, "hf-eot", []))  # the peer's loss over sftflow's trained tokens
        best: dict[str, dict] = {}  # per tool, the round with the most tokens/s (the least disturbed)
        for round_ in range(cli.rounds):
            for python, tool, extra in runs:
                # LLaMA-Factory's venv runs this file with its own packages, without sftflow on the path
                child_env = {**env, "PYTHONPATH": ""} if tool == "llamafactory" else env
                tool_data = data if tool == "sftflow" else peers_data
                result = run_child(python, tool, tool_data, steps, work, extra, child_env)
                print(
                    f"round {round_ + 1}:",
                    result if isinstance(result, str) else json.dumps(result),
                    flush=True,
                )
                if isinstance(result, dict):
                    result["load_avg_1m"] = os.getloadavg()[0]
                    if (
                        result["tool"] not in best
                        or result["tokens_per_s"] > best[result["tool"]]["tokens_per_s"]
                    ):
                        best[result["tool"]] = result
        results = list(best.values())
    print(f"load average after: {os.getloadavg()}", flush=True)
    print(
        f"\n{steps} steps x batch {BATCH} = {steps * BATCH} examples per tool, fp32, LoRA r={RANK} q_proj,v_proj\n"
    )
    limit, sustained, burst, n_params = limit_tokens_per_s()
    print(
        f"4N limit: {limit:.0f} tokens/s (fp32 matmul {sustained / 1e9:.0f} GFLOP/s sustained, median of 30; "
        f"best single run {burst / 1e9:.0f}; N = {n_params / 1e6:.1f}M in matmuls, 4N + 6 x adapter FLOP per token)\n"
    )
    print(table(results, limit))
    print(
        f"\npreprocessing (sftflow, 999 rows, cutoff {CUTOFF}, no cache): {preprocessing_rate():.0f} examples/s"
    )
    print(f"sftflow --help start-up: {startup_time():.3f} s (best of 3)")


if __name__ == "__main__":
    main()
