"""oneDNN Linear layers for generation on a CPU (model/inference.py `onednn_linear`, key `onednn_linear`):
the swap happens where it should, and greedy answers and logprobs match plain nn.Linear."""

from __future__ import annotations

import pytest
import torch

from sftflow.config.run_dir import infer_args
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import SamplingParams
from sftflow.model.inference import onednn_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

PROMPTS = [[{"role": "user", "content": f"Question number {i}?" + " And why" * i}] for i in range(4)]


@pytest.fixture(scope="module")
def engines(run_dir):
    fast = load_engine(infer_args(str(run_dir), []), batched=True)
    plain = load_engine(infer_args(str(run_dir), ["onednn_linear=false"]), batched=True)
    yield fast, plain
    fast.close()
    plain.close()


def linear_types(model):
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


def test_the_key_swaps_every_float32_linear_layer_and_false_keeps_them(engines):
    fast, plain = engines
    assert linear_types(fast.model) == {"MkldnnLinear"}  # the adapter was merged: every layer is plain
    assert linear_types(plain.model) == {"Linear"}


def test_greedy_answers_are_equal_on_both_paths_and_logprobs_within_1e_4(engines):
    fast, plain = engines
    greedy = SamplingParams(max_new_tokens=12)
    for engine_path in ("batch", "exact"):
        params = greedy if engine_path == "batch" else SamplingParams(max_new_tokens=12, seed=0)
        assert fast.path(params) == engine_path
        got = [f.result(timeout=120).choices[0] for f in [fast.submit(p, params) for p in PROMPTS]]
        want = [plain.submit(p, params).result(timeout=120).choices[0] for p in PROMPTS]
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
    scored = SamplingParams(max_new_tokens=6, logprobs=True, top_logprobs=3)
    a = fast.generate(PROMPTS[1], scored).choices[0].logprobs
    b = plain.generate(PROMPTS[1], scored).choices[0].logprobs
    assert [t.token for t in a] == [t.token for t in b]
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)) < 1e-4


def test_only_float32_cpu_models_are_swapped(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert onednn_linear(model) == 0 and linear_types(model) == {"Linear"}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = torch.tensor([[1, 2, 3, 4]])
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    with torch.inference_mode():
        before = model(inputs).logits
        assert onednn_linear(model) == linears > 0
        after = model(inputs).logits
    assert linear_types(model) == {"MkldnnLinear"}
    assert torch.allclose(before, after, atol=1e-5)


def test_a_model_that_reads_a_linear_weight_itself_keeps_plain_layers():
    # Mamba's CPU path multiplies by dt_proj.weight directly, which a oneDNN weight cannot do
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(
        MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    ).eval()
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = model(inputs).logits
        assert onednn_linear(model) == 0  # the probe failed: every layer was put back
        assert torch.equal(model(inputs).logits, before)
    assert linear_types(model) == {"Linear"}


def test_a_swap_that_fails_midway_puts_every_layer_back(tiny_model_dir, monkeypatch):
    import torch.utils.mkldnn
    from transformers import AutoModelForCausalLM

    real, made = torch.utils.mkldnn.MkldnnLinear, []

    def flaky(dense, dtype):
        if len(made) == 3:
            raise MemoryError("no room for the converted weight")
        made.append(dense)
        return real(dense, dtype)

    monkeypatch.setattr(torch.utils.mkldnn, "MkldnnLinear", flaky)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert onednn_linear(model) == 0 and linear_types(model) == {"Linear"}
