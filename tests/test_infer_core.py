"""infer/core.py: the Generator handle the paths get instead of the engine, and the pure settings of a
request (sampling, generation_config); and the one batched path the config accepts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM

from sftflow.config.args import GeneratingArguments
from sftflow.config.parser import args_from_dict
from sftflow.errors import SftflowError
from sftflow.infer.core import context_length, generation_config, make_generator, sampling
from sftflow.infer.requests import SamplingParams


@pytest.fixture(scope="module")
def generator(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    return make_generator(model, tiny_tokenizer, GeneratingArguments(do_sample=True, top_k=7, num_beams=3))


def test_the_generator_holds_what_the_paths_use(generator, tiny_tokenizer):
    assert not generator.model.training  # put in eval mode
    assert (
        generator.stop_ids == sorted(generator.stop_ids) and tiny_tokenizer.eos_token_id in generator.stop_ids
    )
    assert generator.stop_id_set == frozenset(generator.stop_ids)
    assert generator.context_length == 512  # max_position_embeddings of the tiny model
    with pytest.raises(AttributeError):
        generator.context_length = 1  # type: ignore[misc]


def test_context_length_falls_back_to_the_tokenizer_and_refuses_a_sentinel():
    model = SimpleNamespace(config=SimpleNamespace())
    assert context_length(model, SimpleNamespace(model_max_length=300)) == 300  # type: ignore[arg-type]
    with pytest.raises(SftflowError, match="cannot tell this model's context length"):
        context_length(model, SimpleNamespace(model_max_length=10**30))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), (False, 0.95, 0.7)),  # the config's
        (SamplingParams(temperature=0.5), (True, 0.5, 0.7)),  # a request's temperature samples
        (SamplingParams(top_p=0.9), (True, 0.95, 0.9)),
        (SamplingParams(temperature=0, top_p=0.9), (False, 0.95, 0.9)),  # temperature 0 is greedy
    ],
)
def test_sampling_is_the_config_overridden_by_the_request(params, expected):
    config = GeneratingArguments(do_sample=False, temperature=0.95, top_p=0.7)
    assert sampling(params, config) == expected


def test_generation_config_of_an_exact_request(generator):
    sampled = generation_config(generator, SamplingParams(temperature=0.5, top_p=0.8), 9, streaming=False)
    assert (sampled.max_new_tokens, sampled.do_sample, sampled.num_beams) == (9, True, 1)
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.5, 0.8, 7)
    assert sampled.eos_token_id == generator.stop_ids
    assert sampled.pad_token_id == generator.tokenizer.pad_token_id
    greedy = generation_config(generator, SamplingParams(temperature=0), 4, streaming=False)
    assert (greedy.do_sample, greedy.num_beams) == (False, 3)  # the config's beams
    streamed = generation_config(generator, SamplingParams(temperature=0), 4, streaming=True)
    scored = generation_config(generator, SamplingParams(temperature=0, logprobs=True), 4, streaming=False)
    assert streamed.num_beams == scored.num_beams == 1  # one sequence to follow


def test_serve_batching_accepts_dynamic_and_refuses_continuous():
    keys = {"model_name_or_path": "m"}
    assert args_from_dict({**keys, "serve_batching": "dynamic"}, False).generating.serve_batching == "dynamic"
    with pytest.raises(
        SftflowError, match="serve_batching: continuous .* was removed: .* Use serve_batching: dynamic"
    ):
        args_from_dict({**keys, "serve_batching": "continuous"}, False)
