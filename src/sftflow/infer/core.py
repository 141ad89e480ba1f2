"""What every generation path shares: `Generator`, the handle on one loaded model (the model, its
tokenizer, the generating args, the stop ids and the context length), and the pure functions that turn a
request's SamplingParams into its decoding settings (`sampling`, `generation_config`).

The paths (dynamic.py, exact.py) take a Generator and `Job` takes the tokenizer and stop ids; none of them
sees the ChatEngine, which owns the queue and the threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from sftflow.data.encode import stop_token_ids
from sftflow.errors import SftflowError
from sftflow.infer.requests import SamplingParams

if TYPE_CHECKING:
    from sftflow.config.args import GeneratingArguments


@dataclass(frozen=True, eq=False)
class Generator:
    """One loaded model ready to generate; `stop_ids` are sorted, `stop_id_set` holds the same ids."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    generating: GeneratingArguments
    stop_ids: list[int]
    context_length: int
    stop_id_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_id_set", frozenset(self.stop_ids))


def make_generator(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generating: GeneratingArguments
) -> Generator:
    """The Generator of a loaded model (put in eval mode) and its tokenizer.

    Raises:
        SftflowError: the model's context length cannot be told.
    """
    model = model.eval()
    stop_ids = sorted(stop_token_ids(tokenizer))
    return Generator(model, tokenizer, generating, stop_ids, context_length(model, tokenizer))


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context window: max_position_embeddings, else the tokenizer's model_max_length.

    Raises:
        SftflowError: neither tells it.
    """
    value = getattr(model.config, "max_position_embeddings", None)
    if not value:
        value = getattr(tokenizer, "model_max_length", None)
    if not value or value > 10**7:  # tokenizers without a limit report a huge sentinel
        raise SftflowError("cannot tell this model's context length (no max_position_embeddings in config).")
    return int(value)


# vLLM's _SAMPLING_EPS: a temperature below it decodes greedily
GREEDY_BELOW = 1e-5


def sampling(params: SamplingParams, generating: GeneratingArguments) -> tuple[bool, float, float]:
    """(do_sample, temperature, top_p) of a request: the config's, overridden by the request. A temperature
    below GREEDY_BELOW is greedy decoding, as in vLLM: dividing logits by 1e-300 gives inf, which no
    sampler can draw from.

    >>> from types import SimpleNamespace
    >>> config = SimpleNamespace(do_sample=False, temperature=0.95, top_p=0.7)
    >>> sampling(SamplingParams(), config), sampling(SamplingParams(top_p=0.5), config)
    ((False, 0.95, 0.7), (True, 0.95, 0.5))
    >>> sampling(SamplingParams(temperature=0), config), sampling(SamplingParams(temperature=1e-300), config)
    ((False, 0.95, 0.7), (False, 0.95, 0.7))
    """
    g = generating
    do_sample = g.do_sample if params.temperature is None and params.top_p is None else True
    if params.temperature is not None and params.temperature < GREEDY_BELOW:
        do_sample = False
    return (
        do_sample,
        params.temperature if do_sample and params.temperature else g.temperature,
        params.top_p if params.top_p is not None else g.top_p,
    )


def generation_config(
    generator: Generator, params: SamplingParams, max_new_tokens: int, streaming: bool
) -> GenerationConfig:
    """The GenerationConfig of one exact-path request: config defaults, overridden by the request."""
    g = generator.generating
    do_sample, temperature, top_p = sampling(params, g)
    exact_only = params.logprobs or params.grammar or params.echo
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        # streams (and scored or constrained answers) follow a single sequence: no beam search
        "num_beams": 1 if streaming or do_sample or exact_only else g.num_beams,
        "repetition_penalty": g.repetition_penalty,
        "eos_token_id": generator.stop_ids,
        "pad_token_id": generator.tokenizer.pad_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=g.top_k)
    return GenerationConfig(**kwargs)
