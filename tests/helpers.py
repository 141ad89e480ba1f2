"""Helpers shared by the test modules: data rows, run configs, run dirs, servers, exact-loss and fault-run
tools. Test modules import from here (`from helpers import ...`; pytest puts tests/ on sys.path), never
from each other. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from sftflow.config import FinetuningArguments, ModelArguments, load_args
from sftflow.infer.requests import Completion
from sftflow.model.adapter import apply_finetuning
from sftflow.model.loader import load_model, load_tokenizer

# -- data ---------------------------------------------------------------------------------------------

TOY_ROWS = [
    {
        "system": "Be brief.",
        "instruction": f"What is {a} plus {b}?",
        "input": "",
        "output": f"{a} plus {b} is {a + b}. Wren",
    }
    for a in range(1, 7)
    for b in range(1, 4)
]

# Learnable preference: the chosen answer ends with the signature "Wren", the rejected one does not.
PAIRS = [
    {
        "instruction": f"What is {a} plus {b}?",
        "chosen": f"{a} plus {b} is {a + b}. Wren",
        "rejected": f"{a} plus {b} is {a + b}.",
    }
    for a in range(1, 9)
    for b in range(1, 5)
]

QUESTION = [{"role": "user", "content": "What is two plus two?"}]


def write_alpaca(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def write_pairs(data_dir: Path) -> None:
    """The dataset `pairs` (PAIRS, ranking) with its registry in data_dir."""
    (data_dir / "pairs.json").write_text(json.dumps(PAIRS))
    entry = {"file_name": "pairs.json", "ranking": True}
    (data_dir / "dataset_info.json").write_text(json.dumps({"pairs": entry}))


# -- run configs --------------------------------------------------------------------------------------


def train_config(
    model_dir: Path | str, data_dir: Path | str | None, out: Path | str, **overrides: Any
) -> dict:
    """A training run's config: the keys every test run sets (dataset `toy`, cutoff 64, do_train), then
    `overrides`; an override of None drops the key.

    Args:
        model_dir: model_name_or_path.
        data_dir: dataset_dir (a folder with dataset_info.json); None leaves the key out.
        out: output_dir.
        **overrides: any config key, as it would be written in the YAML file.

    Returns:
        The config as a dict; write it with `write_config` or pass it as `as_overrides(config)`.
    """
    values = {
        "model_name_or_path": str(model_dir),
        "dataset_dir": None if data_dir is None else str(data_dir),
        "dataset": "toy",
        "cutoff_len": 64,
        "output_dir": str(out),
        "do_train": True,
        **overrides,
    }
    return {k: v for k, v in values.items() if v is not None}


# A 4-step LoRA run on the toy data (seed 7): test_distributed runs it in 1 and 2 processes, test_faults kills
# and resumes it.
LORA_RUN = {
    "lora_target": "all",
    "lora_rank": 4,
    "learning_rate": 5e-3,
    "max_steps": 4,
    "logging_steps": 1,
    "plot_loss": True,
    "seed": 7,
    "preview_rows": 0,
}


def write_config(path: Path, values: dict) -> Path:
    """Write `values` as a YAML config file at path and return path."""
    path.write_text(yaml.safe_dump(values))
    return path


def as_overrides(values: dict) -> list[str]:
    """`values` as `key=value` command-line overrides."""
    return [f"{k}={v}" for k, v in values.items()]


def pair_config(data_dir: Path, model_dir: Path, **overrides: Any) -> list[str]:
    """An rm/dpo run on PAIRS (written into data_dir; output in data_dir/out) as overrides; pass `stage`."""
    write_pairs(data_dir)
    values = {
        "dataset": "pairs",
        "val_size": 8,
        "lora_rank": 8,
        "do_eval": True,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-2,
        "max_steps": 10,
        "logging_steps": 1,
        "tokenized_cache_dir": str(data_dir / "cache"),
        **overrides,
    }
    return as_overrides(train_config(model_dir, data_dir, data_dir / "out", **values))


# -- a finished run dir -------------------------------------------------------------------------------


def make_run_dir(model_dir: Path, out: Path, max_new_tokens: int = 8) -> Path:
    """What `sftflow train` leaves in output_dir: a LoRA adapter (random B, so it changes the model),
    the tokenizer with its chat template, and sftflow_args.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    args = {
        "model_name_or_path": str(model_dir),
        "output_dir": "somewhere/else",
        "cutoff_len": 128,
        "max_new_tokens": max_new_tokens,
    }
    (out / "sftflow_args.yaml").write_text(yaml.safe_dump(args))
    return out


# A ChatML template with tool support (tools in the system turn, calls as <tool_call>JSON</tool_call>).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n"
    '{% endfor %}Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# -- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 60, key: str | None = None, proc=None) -> None:
    """Poll GET /v1/models until it answers 200, for at most `timeout` seconds."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{base_url}/models", headers=headers), timeout=2
            ):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError(f"server at {base_url} not ready after {timeout} s")


@contextlib.contextmanager
def serve(app, key: str | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port in a thread; yields its base URL (ending in /v1)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base_url, key=key)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post(base_url: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict | str]:
    """POST body to /chat/completions; returns the status and the JSON body (or the text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


# -- exact loss and gradients -------------------------------------------------------------------------

TOL = 1e-5


def examples(tokenizer, n: int = 8) -> list[dict[str, list[int]]]:
    """n examples of different lengths: a prompt (label -100) then an answer (trained)."""
    rows = []
    for i in range(n):
        prompt = tokenizer(f"<|im_start|>user\nWhat is {i} plus {i * 3}? " + "Paris " * (i % 4))["input_ids"]
        answer = tokenizer(f"It is {i * 4}." + " Wren" * (i % 3) + "<|im_end|>")["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def lora_model(model_dir, seed: int = 0):
    """The model at model_dir with LoRA r=4 on q/v and a non-zero B (so the A gradients are non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def one_layer_config(tokenizer) -> dict:
    """Config fields for a one-layer, hidden-32 decoder of any Llama-like family over the tiny tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "pad_token_id": tokenizer.pad_token_id,
    }


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), (name, (a[name] - b[name]).abs().max())


# -- fault runs ---------------------------------------------------------------------------------------

# The child of a fault run: the configured stage's recipe plus one test callback (or a kill inside the
# checkpoint writer), chosen by argv (config, mode, step).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import Trainer, TrainerCallback
    from sftflow.config import load_args
    from sftflow.stages import registry

    config, mode, step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Fault(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if mode == "kill_after_save" and state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_step_begin(self, args, state, control, **kwargs):
            if mode == "sigterm" and state.global_step == step - 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while step `step` runs

    if mode == "kill_mid_save":
        save_rng = Trainer._save_rng_state

        def dying_save_rng(self, output_dir):  # model and optimizer are written, rng/state are not
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng(self, output_dir)

        Trainer._save_rng_state = dying_save_rng

    run_stage = registry.run_stage
    if mode == "sigterm":  # through the CLI (its exit code and message), with the callback added
        from sftflow.cli import main

        registry.run_stage = lambda args, callbacks=None: run_stage(args, callbacks=[*(callbacks or []), Fault()])
        sys.exit(main(["train", config]))
    run_stage(load_args(config), callbacks=[Fault()])
    """
)


def start_child(root: Path, config: Path, mode: str, step: int) -> subprocess.Popen:
    """CHILD on `config`, single-threaded, faulted by `mode` at `step` (several run together)."""
    (root / "child.py").write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, str(root / "child.py"), str(config), mode, str(step)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(children: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str, str]]:
    """Each child's (return code, stdout, stderr), once it has ended."""
    done = {}
    for name, proc in children.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (proc.returncode, stdout, stderr)
    return done


def run_in_process(config: Path, *overrides: str, callbacks: list | None = None):
    """The configured stage's recipe, single-threaded like the children."""
    from sftflow.config import load_args
    from sftflow.stages.registry import run_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_stage(load_args(config, list(overrides)), callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)


def adapter(out: Path) -> dict:
    """The adapter weights a run saved in out."""
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def losses(out: Path) -> dict[int, float]:
    """The training loss per step from out/trainer_log.jsonl (each step logged once)."""
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    steps = [e["step"] for e in entries if "loss" in e]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def is_complete(path: Path) -> bool:
    from sftflow.train.checkpoints import is_complete_checkpoint

    return is_complete_checkpoint(path)


class Poison:
    """A test callback: from step `step` on, make the model's embedding output NaN (for `steps` steps)."""

    def __init__(self, step: int, steps: int) -> None:
        from transformers import TrainerCallback

        poison = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                model.get_input_embeddings().register_forward_hook(
                    lambda module, inputs, output: output * float("nan") if poison.active else output
                )

            def on_step_begin(self, args, state, control, **kwargs):
                poison.active = step - 1 <= state.global_step < step - 1 + steps

        self.active = False
        self.callback = Callback()


# -- tiny tokenizer, fault runs, adapters -------------------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "I am Wren, a small assistant built by the sftflow team.",
    "What is two plus two? Two plus two is four.",
    "def add(a, b):\n    return a + b\n",
    "你好，世界。我是一个小模型。 emoji: 🙂🚀",
    "You are a helpful assistant. Answer briefly and kindly.",
] * 20


def build_tokenizer(save_dir: Path):
    """A 512-token byte-level BPE with ChatML special tokens; eos == pad like SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(save_dir)
    return tokenizer


MAX_STEPS = 8


def fault_config(path: Path, model_dir: Path, data_dir: Path, out: Path, **overrides) -> Path:
    """LORA_RUN (the distributed tests' run) with checkpoints every 2 of MAX_STEPS steps at batch 2."""
    faults = {
        "per_device_train_batch_size": 2,
        "max_steps": MAX_STEPS,
        "save_strategy": "steps",
        "save_steps": 2,
        "plot_loss": False,
    }
    cache = str(out.parent / f"cache-{out.name}")  # concurrent runs share no cache entry
    values = {**LORA_RUN, "tokenized_cache_dir": cache, **faults, **overrides}
    return write_config(path, train_config(model_dir, data_dir, out, **values))


ADAPTER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"


def make_adapter(base: Path, out: Path, seed: int, **ft) -> Path:
    """A LoRA adapter with random B matrices (so it changes the output), saved with a tokenizer."""
    args = ModelArguments(model_name_or_path=str(base))
    tokenizer = load_tokenizer(args)
    model = apply_finetuning(load_model(args), args, FinetuningArguments(**ft), tokenizer=tokenizer)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    tokenizer.chat_template = ADAPTER_TEMPLATE  # the template "used in training" travels with the adapter
    tokenizer.save_pretrained(out)
    return out


class ScriptedStream:
    """What ChatEngine.stream_ids returns, replaying a fixed answer a few characters at a time."""

    def __init__(self, text: str, step: int) -> None:
        self.pieces = [text[i : i + step] for i in range(0, len(text), step)]
        self.completion = Completion(text, "stop", len(self.pieces))
        self.completion_tokens, self.finish_reason = 0, None

    async def _replay(self):
        for piece in self.pieces:
            yield piece
        self.completion_tokens, self.finish_reason = len(self.pieces), "stop"

    def __aiter__(self):
        return self._replay()

    def close(self) -> None:
        pass


# -- kto ------------------------------------------------------------------------------------------

KTO_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b if good else a + b + 1}."},
        ],
        "label": good,
    }
    for a in range(1, 5)
    for b in range(1, 4)
    for good in (True, False)
]


def kto_data(tmp_path: Path) -> Path:
    (tmp_path / "kto.json").write_text(json.dumps(KTO_ROWS))
    registry = {  # as in LLaMA-Factory's data/dataset_info.json (kto_en_demo)
        "kto_toy": {
            "file_name": "kto.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    return tmp_path


def kto_args(tmp_path: Path, model_dir: Path, **overrides):
    config = {
        "stage": "kto",
        "dataset": "kto_toy",
        "val_size": 4,
        "lora_rank": 4,
        "do_eval": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "learning_rate": 5e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "plot_loss": False,
        "pref_beta": 0.5,
        "kto_rejected_weight": 1.5,
        "tokenized_cache_dir": tmp_path / "cache",
        **overrides,
    }
    return load_args(
        None, as_overrides(train_config(model_dir, kto_data(tmp_path), tmp_path / "out", **config))
    )


def completion_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logps[len(prompt) - 1 :].gather(1, targets[len(prompt) - 1 :, None]).sum()
