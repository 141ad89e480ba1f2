"""The GPU check's training part (benchmarks/gpu_check.sh runs it after the tests marked `gpu`).

(b) A random-initialised Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8 heads, vocab 128256,
    tied embeddings) trains with LoRA r16 on all linear layers, bf16, cutoff 2048, packed, for --steps
    steps, three ways on the same packed rows (sftflow's data step, read from its cache by the other two):
    sftflow (`sftflow train`'s recipe), the plain HF Trainer (the model's own loss) and TRL's SFTTrainer.
    Each prints tokens/s (non-pad, steps 2..N) and MFU: sftflow's FLOP count (train/perf.py,
    docs/speed.md) of the tokens trained, over the chip's dense bf16 peak (perf.GPU_PEAK_TFLOPS).
(c) sftflow's peak allocated GPU memory against `sftflow plan`'s prediction of the same run (its peak less
    the CUDA context, which the allocator does not count): within --memory-tolerance, or the check fails.

Each arm runs in its own process (its own peak memory). `--dry-run` runs the whole pipeline on CPU with a
tiny shape, cutoff 128 and 3 steps in fp32 (tests/test_gpu_check.py), where MFU and the memory check are
printed against the CPU's figures and never fail the run.

    python benchmarks/gpu_check.py                 # on the GPU: ~3-5 minutes
    python benchmarks/gpu_check.py --dry-run       # anywhere: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = 4000  # a word-level vocabulary: one token per word, so lengths are exact


def settings(dry_run: bool) -> dict:
    if dry_run:
        return {
            "shape": TINY,
            "vocab": None,
            "cutoff": 128,
            "batch": 2,
            "steps": 3,
            "bf16": False,
            "rows": 40,
        }
    return {"shape": LLAMA_1B, "vocab": 128256, "cutoff": 2048, "batch": 4, "rows": 1200, "bf16": True}


# ---------------------------------------------------------------- setup: tokenizer, model, data


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {token: i for i, token in enumerate([*specials, *(f"w{i}" for i in range(WORDS))])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)
    return tokenizer


def build_model(out: Path, tokenizer, config: dict) -> None:
    """A random-initialised Llama of the run's shape, saved in bf16 (fp32 for the dry run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=config["vocab"] or len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config["shape"],
    )
    dtype = torch.bfloat16 if config["bf16"] else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(llama).to(dtype)
    model.save_pretrained(out)


def write_data(out: Path, config: dict) -> None:
    """Alpaca rows of random words: prompts of 20-200 words, answers of 50-600 (scaled to the cutoff)."""
    rng = random.Random(0)
    scale = config["cutoff"] / 2048

    def text(low: int, high: int) -> str:
        return " ".join(
            f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(int(low * scale), int(high * scale)))
        )

    rows = [
        {"instruction": text(20, 200), "input": "", "output": text(50, 600)} for _ in range(config["rows"])
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(rows))
    (out / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "train.json"}}))


def run_config(work: Path, config: dict, steps: int) -> Path:
    import yaml

    values = {
        "model_name_or_path": str(work / "model"),
        "dataset_dir": str(work / "data"),
        "dataset": "synthetic",
        "cutoff_len": config["cutoff"],
        "packing": True,
        "lora_target": "all",
        "lora_rank": 16,
        "lora_alpha": 32,
        "output_dir": str(work / "sftflow"),
        "overwrite_output_dir": True,
        "tokenized_cache_dir": str(work / "cache"),
        "do_train": True,
        "bf16": config["bf16"],
        "max_steps": steps,
        "per_device_train_batch_size": config["batch"],
        "learning_rate": 1e-4,
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "seed": 42,
        "preview_rows": 0,
    }
    if config["dry_run"]:
        values["use_cpu"] = True
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------- child side: one arm per process


def timing_callback():
    """A TrainerCallback recording (time, non-pad tokens seen) at the end of every optimizer step."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    return Timing()


def packed_rows(config_path: Path):
    """sftflow's packed training rows, as `sftflow train` builds them: its data step (a hit on the cache
    the sftflow arm wrote), shuffled with the run's seed, packed to cutoff_len."""
    from sftflow.config import load_args
    from sftflow.data.packing import pack_dataset
    from sftflow.data.prepare import prepare, shuffled
    from sftflow.model.loader import load_chat_tokenizer

    args = load_args(config_path)
    tokenizer = load_chat_tokenizer(args.model, args.data)
    prepared = prepare("sft", args.data, tokenizer, args.training.seed, True)
    train = shuffled(prepared.train, args.training.seed, args.data.buffer_size)
    return pack_dataset(train, args.data.cutoff_len), tokenizer, args


def lora_model(args, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.training.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model.model_name_or_path, dtype=dtype).to(device)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def common_args(args) -> dict:
    training = args.training
    return {
        "output_dir": str(Path(training.output_dir).parent / "baseline"),
        "max_steps": training.max_steps,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "learning_rate": training.learning_rate,
        "bf16": training.bf16,
        "use_cpu": training.use_cpu,
        "gradient_checkpointing": False,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "include_num_input_tokens_seen": "non_padding",
        "remove_unused_columns": False,
    }


def pad_collator(pad_id: int):
    import torch

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = (
                torch.tensor(r["input_ids"]),
                torch.tensor(r["labels"]),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def run_arm(arm: str, config_path: Path) -> dict:
    """Train one arm; returns its step timings and peak memory."""
    import torch

    from sftflow.train.perf import peak_memory_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = timing_callback()
    if arm == "sftflow":
        from sftflow.config import load_args
        from sftflow.stages.sft import run_sft

        run_sft(load_args(config_path), callbacks=[timing])
    else:
        rows, tokenizer, args = packed_rows(config_path)
        model = lora_model(args, device)
        if arm == "hf":  # the model's own loss on the padded packed rows (examples attend across a row)
            from transformers import Trainer, TrainingArguments

            trainer = Trainer(
                model=model,
                args=TrainingArguments(**common_args(args)),
                train_dataset=rows.select_columns(["input_ids", "labels"]),
                data_collator=pad_collator(tokenizer.pad_token_id),
                callbacks=[timing],
            )
        else:  # TRL's SFTTrainer on the same rows, completion-only loss from sftflow's labels
            from trl import SFTConfig, SFTTrainer

            rows = rows.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]})
            trainer = SFTTrainer(
                model=model,
                args=SFTConfig(**common_args(args), max_length=None, packing=False),
                train_dataset=rows.select_columns(["input_ids", "completion_mask"]),
                processing_class=tokenizer,
                callbacks=[timing],
            )
        trainer.train()
    return {"arm": arm, "steps": timing.steps, "peak_bytes": peak_memory_bytes(torch.device(device))}


# ---------------------------------------------------------------- parent side


def child(arm: str, work: Path, timeout: float) -> dict:
    result = work / f"{arm}.json"
    command = [sys.executable, __file__, "--arm", arm, "--work", str(work)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"gpu_check: the {arm} arm failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def rate(steps: list[list[float]]) -> float:
    """Non-pad tokens/s from the end of step 1 to the end of the last step (step 1's warm-up left out)."""
    (t0, n0), (t1, n1) = steps[0], steps[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def run_flops(config_path: Path) -> tuple[float, float]:
    """sftflow's training FLOPs per token of this run (at the mean example length) and the device's
    dense bf16 peak (0 where unknown: CPU)."""
    import torch
    from transformers import AutoConfig

    from sftflow.train.perf import ModelShape, TrainSetup, flops_per_token, known_gpu_flops

    rows, _, args = packed_rows(config_path)
    examples = sum(sum(1 for p in row if p == 0) for row in rows["position_ids"])
    seq = sum(len(row) for row in rows["input_ids"]) / max(examples, 1)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(args.model.model_name_or_path))
    setup = TrainSetup.from_args(shape, args.finetuning)
    peak = known_gpu_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return flops_per_token(shape, setup, seq, gradient_checkpointing=False), peak or 0.0


def memory_check(config_path: Path, peak: int, tolerance: float) -> tuple[bool, str]:
    """sftflow's peak allocated memory against `sftflow plan`'s prediction (less the CUDA context)."""
    from sftflow.config import load_args
    from sftflow.tools.plan import build_plan

    memory = build_plan(load_args(config_path)).memory
    predicted = memory.peak - memory.runtime - memory.allocator
    ratio = peak / predicted if predicted else float("nan")
    ok = abs(ratio - 1) <= tolerance
    return (
        ok,
        f"peak memory: measured {peak / 2**30:.2f} GiB, plan {predicted / 2**30:.2f} GiB (x{ratio:.2f})",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on CPU: the pipeline in seconds")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--arms", default="sftflow,hf,trl")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temporary one)")
    parser.add_argument("--memory-tolerance", type=float, default=0.25)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.arm:
        (options.work / f"{options.arm}.json").write_text(
            json.dumps(run_arm(options.arm, options.work / "run.yaml"))
        )
        return 0
    config = {**settings(options.dry_run), "dry_run": options.dry_run}
    steps = config.get("steps", options.steps)
    with tempfile.TemporaryDirectory(prefix="sftflow-gpu-check-") as scratch:
        work = options.work or Path(scratch)
        started = time.perf_counter()
        tokenizer = build_tokenizer(work / "model")
        build_model(work / "model", tokenizer, config)
        write_data(work / "data", config)
        config_path = run_config(work, config, steps)
        print(f"gpu_check: model and data ready in {time.perf_counter() - started:.0f} s", flush=True)
        results = [child(arm, work, timeout=240) for arm in options.arms.split(",")]
        return report(results, config_path, options, started)


def report(results: list[dict], config_path: Path, options: argparse.Namespace, started: float) -> int:
    per_token, peak = run_flops(config_path)
    print(f"{'arm':<8} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        tokens = rate(r["steps"])
        mfu = f"{tokens * per_token / peak:.1%}" if peak else "n/a"
        print(f"{r['arm']:<8} {tokens:>10.0f} {mfu:>7} {r['peak_bytes'] / 2**30:>9.2f}")
    ok = all(rate(r["steps"]) > 0 for r in results)
    sftflow = next((r for r in results if r["arm"] == "sftflow"), None)
    if sftflow:
        fits, line = memory_check(config_path, sftflow["peak_bytes"], options.memory_tolerance)
        print(line + ("" if fits else f": off by more than {options.memory_tolerance:.0%}"))
        ok = ok and (fits or options.dry_run)  # a CPU's RSS is not what the plan predicts for a GPU
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
