"""The chat engine on a tiny model + LoRA adapter: loading from a run dir, generation, streaming, stop
strings, length checks, and concurrent callers that never mix."""

from __future__ import annotations

import json
import threading

import pytest

from helpers import QUESTION
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError
from sftflow.infer.chat import fit_history
from sftflow.infer.engine import load_engine
from sftflow.infer.requests import (
    EngineBusy,
    RequestError,
    SamplingParams,
    StopBuffer,
    cut_at_stop,
    validate_messages,
)


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = load_engine(infer_args(str(run_dir), []))
    yield engine
    engine.close()


def test_run_dir_alone_gives_model_adapter_and_settings(run_dir, tiny_model_dir):
    args = infer_args(str(run_dir), ["max_new_tokens=5"])
    assert args.model.model_name_or_path == str(tiny_model_dir)
    assert args.model.adapter_name_or_path == str(run_dir)
    assert args.generating.max_new_tokens == 5  # overrides win over sftflow_args.yaml
    assert args.training.output_dir == str(run_dir)  # the run dir, not the path written at training time


def test_adapter_without_args_file_finds_its_base_model(run_dir, tiny_model_dir, tmp_path):
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    args = infer_args(str(bare), [])
    assert (
        args.model.model_name_or_path
        == json.loads((bare / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    assert args.model.model_name_or_path == str(tiny_model_dir)
    flags = infer_args(None, [], model=str(tiny_model_dir), adapter=str(run_dir))
    assert (flags.model.model_name_or_path, flags.model.adapter_name_or_path) == (
        str(tiny_model_dir),
        str(run_dir),
    )


def test_dir_without_model_or_adapter_is_refused(tmp_path):
    with pytest.raises(SftflowError, match="neither a LoRA adapter"):
        infer_args(str(tmp_path), [])


def test_generate_matches_the_peft_model_on_the_chat_template(
    engine, run_dir, tiny_model_dir, tiny_tokenizer
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = engine.generate(QUESTION, SamplingParams(max_new_tokens=6))
    prompt = tiny_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert result.prompt_tokens == len(ids)

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir
    ).eval()
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    new = expected[0, len(ids) :].tolist()
    assert result.choices[0].text == tiny_tokenizer.decode(new, skip_special_tokens=True)
    assert result.choices[0].completion_tokens == 6 and result.choices[0].finish_reason == "length"
    # the adapter is applied: the base model alone scores the prompt differently
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(torch.tensor([ids])).logits, engine.model(torch.tensor([ids])).logits)


def test_stream_yields_the_same_answer_as_generate(engine):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    plain = engine.generate(QUESTION, params).choices[0]
    stream, prompt_tokens = engine.stream(QUESTION, params)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == plain.text
    assert (stream.finish_reason, stream.completion_tokens) == (plain.finish_reason, plain.completion_tokens)
    assert prompt_tokens == engine.generate(QUESTION, SamplingParams(max_new_tokens=1)).prompt_tokens


def test_stop_strings_cut_plain_and_streamed_answers(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    full = engine.generate(QUESTION, params).choices[0].text
    stop = full[4:6]
    assert stop and stop in full
    expected = full[: full.find(stop)]
    cut = engine.generate(QUESTION, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop=[stop]))
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    stream, _ = engine.stream(
        QUESTION, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop=[stop])
    )
    assert "".join(stream) == expected and stream.finish_reason == "stop"


def test_n_answers_sampled_with_a_seed_are_reproducible(engine):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=11)
    first = [c.text for c in engine.generate(QUESTION, params).choices]
    assert len(first) == 3 and len(set(first)) > 1
    assert [c.text for c in engine.generate(QUESTION, params).choices] == first
    greedy = engine.generate(QUESTION, SamplingParams(max_new_tokens=4, n=2))
    assert len(greedy.choices) == 2 and greedy.choices[0] == greedy.choices[1]


def test_concurrent_callers_get_their_own_answers(engine):
    """Eight threads at once, each with its own prompt and seed, get exactly their sequential answers."""
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(8)]
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i) for i in range(8)]
    sequential = [engine.generate(p, s).choices[0].text for p, s in zip(prompts, params, strict=True)]
    assert len(set(sequential)) > 4
    results: dict[int, str] = {}
    start = threading.Barrier(8)

    def ask(i: int) -> None:
        start.wait()
        if i % 2:
            stream, _ = engine.stream(prompts[i], params[i])
            results[i] = "".join(stream)
        else:
            results[i] = engine.generate(prompts[i], params[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(8)] == sequential


def test_context_length_is_enforced(engine):
    assert engine.context_length == 512  # max_position_embeddings of the tiny model
    long = [{"role": "user", "content": "the quick brown fox " * 200}]
    with pytest.raises(RequestError, match="context length of 512") as info:
        engine.generate(long)
    assert info.value.param == "messages"
    prompt_tokens = len(engine.encode(QUESTION))
    with pytest.raises(RequestError, match=f"Lower max_tokens to {512 - prompt_tokens}"):
        engine.generate(QUESTION, SamplingParams(max_new_tokens=512))
    assert engine.max_new_tokens(510, None) == 2  # the config's max_new_tokens is capped to the room left


def test_fit_history_drops_the_oldest_turns_first(engine):
    system = {"role": "system", "content": "Be brief."}
    old = [{"role": "user", "content": "fox " * 100}, {"role": "assistant", "content": "dog " * 100}]
    recent = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    question = {"role": "user", "content": "Who are you?"}
    messages, dropped = fit_history(engine, [system, *old, *old, *recent, question], reserve=100)
    assert messages[0] == system and messages[-3:] == [*recent, question]
    assert dropped >= 2 and len(engine.encode(messages)) + 100 <= 512


def test_validate_messages():
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert validate_messages(ok) == ok
    for bad, match in [
        ([], "messages is empty"),
        ([{"role": "robot", "content": "x"}], "role is 'robot'"),
        ([{"role": "user", "content": "  "}], r"messages\[0\].content is empty"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must"),
    ]:
        with pytest.raises(RequestError, match=match):
            validate_messages(bad)


def test_stop_helpers():
    assert cut_at_stop("abc###def", ["###", "d"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    buffer = StopBuffer(["</s>", "END"])
    assert buffer.feed("Hello <") == ("Hello ", False)  # "<" may start "</s>": held back
    assert buffer.feed("b> E") == ("<b> ", False)
    assert buffer.feed("N") == ("", False)
    assert buffer.feed("Dx") == ("", True)  # "END" reached: nothing of it is emitted
    buffer = StopBuffer(["END"])
    assert buffer.feed("the EN") == ("the ", False)
    assert buffer.flush() == "EN"


# -- the batch path (dynamic batching) and the exact path's extras ---------------------------------


@pytest.fixture(scope="module")
def batched(run_dir):
    overrides = ["serve_max_queue=4"]
    engine = load_engine(infer_args(str(run_dir), overrides), batched=True)
    yield engine
    engine.close()


def test_batch_path_greedy_equals_generate_token_for_token(batched, engine):
    # prompts of different lengths: the dynamic path left-pads them into one batch
    prompts = [[{"role": "user", "content": f"Question number {i}?" + " And why" * i}] for i in range(6)]
    params = SamplingParams(max_new_tokens=8)
    assert batched.path(params) == "batch" and engine.path(params) == "exact"
    expected = [engine.generate(p, params).choices[0] for p in prompts]
    futures = [batched.submit(p, params) for p in prompts[:4]]  # four at once share forward passes
    got = [f.result(timeout=120).choices[0] for f in futures]
    assert batched._dynamic.largest_batch > 1
    got += [batched.generate(p, params).choices[0] for p in prompts[4:]]
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == [
        (c.text, c.finish_reason, c.completion_tokens) for c in expected
    ]
    stream, prompt_tokens = batched.stream(prompts[0], params)
    assert "".join(stream) == expected[0].text and stream.completion_tokens == 8
    assert prompt_tokens == len(engine.encode(prompts[0]))


def test_batch_path_routes_what_it_cannot_carry_to_the_exact_path(batched):
    assert batched.path(SamplingParams(temperature=0.7, top_p=0.9, n=3)) == "batch"
    for params in [
        SamplingParams(seed=1),
        SamplingParams(logprobs=True),
        SamplingParams(echo=True),
        SamplingParams(grammar="{}"),
    ]:
        assert batched.path(params) == "exact"
    batched.generating.repetition_penalty = 1.2  # the batch path does not apply it: such a config goes exact
    try:
        assert batched.path(SamplingParams()) == "exact"
    finally:
        batched.generating.repetition_penalty = 1.0
    sampled = batched.generate(QUESTION, SamplingParams(max_new_tokens=6, temperature=1.0, n=3))
    assert len(sampled.choices) == 3 and all(c.completion_tokens == 6 for c in sampled.choices)
    assert len({c.text for c in sampled.choices}) > 1  # n sampled answers are n requests


def test_batch_path_stop_string_ends_the_request_early(batched):
    result = batched.generate(QUESTION, SamplingParams(max_new_tokens=40, stop=["\n\n"])).choices[0]
    assert result.text == "" and result.finish_reason == "stop"  # the tiny model answers "\n\n\n..."
    assert result.completion_tokens <= 3  # cancelled at the stop string, not run to 40 tokens


def test_closed_stream_cancels_its_request_and_frees_its_slot(batched):
    stream, _ = batched.stream(QUESTION, SamplingParams(max_new_tokens=400))
    pieces = iter(stream)
    next(pieces)
    assert batched.held == 1
    stream.close()
    assert batched.held == 0  # the slot is free at once
    after = batched.generate(QUESTION, SamplingParams(max_new_tokens=3)).choices[0]
    assert after.completion_tokens == 3  # the engine goes on serving


def test_full_queue_raises_engine_busy(batched):
    streams = [batched.stream(QUESTION, SamplingParams(max_new_tokens=400))[0] for _ in range(4)]
    with pytest.raises(EngineBusy, match="serve_max_queue=4") as info:
        batched.submit(QUESTION, SamplingParams(max_new_tokens=2))
    assert info.value.retry_after >= 1
    for stream in streams:
        stream.close()
    assert batched.held == 0
    assert batched.generate(QUESTION, SamplingParams(max_new_tokens=2)).choices[0].completion_tokens == 2


def test_cache_is_sized_from_the_config_not_the_library_default(batched):
    assert batched.model.config._attn_implementation == "sdpa"
    # a batch fits serve_max_batch_tokens and the memory budget
    dynamic = batched._dynamic
    context = batched.context_length
    assert dynamic.fits(1, context - 8, 8)  # one request always runs
    assert dynamic.fits(2, 100, 8) and not dynamic.fits(3, 1000, 8)  # serve_max_batch_tokens=2048
    assert not dynamic.fits(2, 10, context)  # padded past the model's positions
    dynamic.prefixes.clear()
    rows = dynamic.cache_budget // (dynamic.token_bytes * 20)
    generating = batched.generating
    generating.serve_max_batch_tokens = 10**9  # only the memory budget limits now
    try:
        assert dynamic.fits(rows, 10, 10) and not dynamic.fits(rows + 1, 10, 10)
        dynamic.prefixes[tuple(range(40))] = None  # a kept prefix takes its share of the budget
        assert not dynamic.fits(rows, 10, 10) and dynamic.fits(rows - 2, 10, 10)
    finally:
        generating.serve_max_batch_tokens = 2048
        dynamic.prefixes.clear()


def test_logprobs_and_echo_match_a_forward_pass(engine):
    import torch

    params = SamplingParams(max_new_tokens=4, logprobs=True, top_logprobs=3, echo=True)
    completion = engine.generate(QUESTION, params).choices[0]
    prompt = engine.encode(QUESTION)
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        expected = torch.log_softmax(engine.model(ids).logits[0].float(), dim=-1)
    assert len(completion.logprobs) == 4
    for k, item in enumerate(completion.logprobs):
        pos = len(prompt) - 1 + k
        assert item.token_id == completion.token_ids[k]
        assert item.logprob == pytest.approx(float(expected[pos, item.token_id]), abs=1e-4)
        assert len(item.top) == 3 and item.top[0][2] == pytest.approx(float(expected[pos].max()), abs=1e-4)
    echoed = completion.prompt_logprobs
    assert echoed[0] is None and len(echoed) == len(prompt)
    assert echoed[1].logprob == pytest.approx(float(expected[0, prompt[1]]), abs=1e-4)


def test_grammar_constrains_the_answer_to_a_json_schema(engine):
    from sftflow.infer.constrain import json_schema_grammar

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["cm", "m"]}},
        "required": ["answer", "unit"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_new_tokens=60, grammar=json_schema_grammar(schema), temperature=1.0, seed=2)
    completion = engine.generate(QUESTION, params).choices[0]
    value = json.loads(completion.text)  # the random tiny model writes valid JSON only under the grammar
    assert (
        set(value) == {"answer", "unit"} and isinstance(value["answer"], int) and value["unit"] in ("cm", "m")
    )
    assert completion.finish_reason == "stop"
    with pytest.raises(SftflowError, match="cannot be enforced"):
        json_schema_grammar({"type": "no-such-type"})


def test_job_text_equals_decode_also_when_cut_inside_a_character(tiny_tokenizer):
    """Streamed text holds back an incomplete multi-byte character; an answer cut there (max_new_tokens)
    ends as `decode` gives it, like the batch decode of predict."""
    from sftflow.infer.requests import Job

    ids = tiny_tokenizer.encode("€ü ñ", add_special_tokens=False)  # bytes: not merged by the tiny BPE
    cut = next(k for k in range(2, len(ids)) if tiny_tokenizer.decode(ids[:k]).endswith("\ufffd"))
    stop_ids = {tiny_tokenizer.eos_token_id}
    job = Job(tiny_tokenizer, stop_ids, [1], SamplingParams(), max_new_tokens=cut, streaming=True, seed=None)
    for token in ids[:cut]:
        job.feed([token])
    job.finish()
    completion = job.future.result()
    assert completion.text == tiny_tokenizer.decode(ids[:cut]) and completion.finish_reason == "length"
