"""The exact path: one `model.generate` per request, with logits processors, for what the batch path
cannot carry: grammar-constrained decoding (response_format, forced tool calls), logprobs /
top_logprobs, echo (the prompt's logprobs), a per-request seed, beam search.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sftflow.infer import kv
from sftflow.infer.constrain import GrammarProcessor
from sftflow.infer.core import Generator, generation_config
from sftflow.infer.requests import Job, TokenLogprob

# one step's log-softmax over the vocabulary, its top-k ids and their values
Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def run_exact(generator: Generator, job: Job) -> None:
    """Generate `job` with `generate`, feeding it token by token (and each token's logprob when asked)."""
    params = job.params
    top = max(params.top_logprobs, 1) if params.logprobs else 0
    recorder = Recorder(top)
    processors: list[Recorder | GrammarProcessor] = [recorder] if top else []
    if params.grammar is not None:
        processors.append(GrammarProcessor(generator.tokenizer, params.grammar, generator.stop_ids))

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), job.cancelled.is_set(), device=input_ids.device)

    class Feed(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate hands the prompt over first
                self.prompt_seen = True
                return
            ids = value.reshape(-1).tolist()
            for token in ids:
                if top and recorder.steps:  # each step's full-vocabulary row is dropped once read
                    step = recorder.steps.popleft()
                    job.logprobs.append(token_logprob(generator.tokenizer, token, step))
            if job.feed(ids):
                job.cancelled.set()

        def end(self) -> None:
            pass

    if job.seed is not None:
        torch.manual_seed(job.seed)
    input_ids = torch.tensor([job.prompt_ids], device=generator.model.device)
    with torch.inference_mode():
        echoed = prompt_logprobs(generator, input_ids, params.top_logprobs) if params.echo else None
        if job.max_new_tokens > 0:  # (max_tokens 0 with echo only scores the prompt)
            config = generation_config(generator, params, job.max_new_tokens, job.events is not None)
            generator.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                streamer=Feed(),
            )
    job.finish(echoed)


def token_logprob(tokenizer: PreTrainedTokenizerBase, token: int, step: Step) -> TokenLogprob:
    """`token`'s logprob and the top alternatives from one step's (logprobs, top ids, top values)."""
    logprobs, top_ids, top_values = step
    top = [(i, tokenizer.decode([i]), v) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
    return TokenLogprob(token, tokenizer.decode([token]), float(logprobs[token]), top)


def prompt_logprobs(generator: Generator, input_ids: torch.Tensor, top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first), and the `top`
    likeliest tokens at each position.

    The prompt is read in chunks through a KV cache, so at most PROMPT_LOGITS_ELEMENTS logits exist at
    once (prompt x vocabulary would be 590 MB for 3000 tokens of SmolLM2), and only each position's
    logsumexp, chosen logit and top-k are kept.
    """
    model = generator.model
    vocab = len(generator.tokenizer)  # (the model's rows may be padded a little past it)
    chunk = max(PROMPT_CHUNK_MIN, PROMPT_LOGITS_ELEMENTS // vocab)
    ids = input_ids[0]
    cache = kv.new_cache(model)
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, chunk):  # the last token's logits predict nothing in the prompt
        end = min(start + chunk, len(ids) - 1)
        logits = (
            model(
                input_ids=input_ids[:, start:end],
                attention_mask=torch.ones_like(input_ids[:, :end]),  # (sdpa's is_causal alone is misaligned)
                position_ids=torch.arange(start, end, device=input_ids.device)[None],
                cache=cache,
                use_cache=True,
            )
            .logits[0]
            .float()
        )
        norm = logits.logsumexp(-1, keepdim=True)
        targets = ids[start + 1 : end + 1]
        chosen = (logits.gather(-1, targets[:, None]) - norm)[:, 0].tolist()
        values, top_ids = logits.topk(max(top, 1), dim=-1)
        values = values - norm
        del logits
        for pos, token in enumerate(targets.tolist()):
            alternatives = [
                (i, generator.tokenizer.decode([i]), v)
                for i, v in zip(top_ids[pos, :top].tolist(), values[pos, :top].tolist(), strict=True)
            ]
            out.append(TokenLogprob(token, generator.tokenizer.decode([token]), chosen[pos], alternatives))
    return out


# prompt scoring reads at most this many logits at once (64 MB of float32), and at least PROMPT_CHUNK_MIN
# positions per pass
PROMPT_LOGITS_ELEMENTS = 2**24
PROMPT_CHUNK_MIN = 16


class Recorder:
    """A logits processor that keeps each step's log-softmax (after repetition penalty, before sampling
    warpers and grammar masks) and its top-k, to report logprobs of the tokens `generate` picks."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.steps: deque[Step] = deque()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(scores[0].float(), dim=-1)
        values, ids = logprobs.topk(self.top)
        self.steps.append((logprobs, ids, values))
        return scores
