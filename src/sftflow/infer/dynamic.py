"""The dynamic-batching path: the requests waiting when the model is free run together through one
left-padded `model.generate`, each row streamed, stopped and resolved on its own.

Why not transformers' continuous batching by default: on CPU its paged-attention step costs about twice a
`generate` step at the same batch (SmolLM2-135M, 16 rows: ~0.24 s vs ~0.11 s; benchmarks/api_load.py),
so batches of whole requests answer faster even though a request that arrives mid-batch waits for the
batch to end. `serve_batching: continuous` selects the other path (infer/batch.py).

A row ends at a stop token, a stop string, its own token budget or a cancel: a StoppingCriteria feeds each
row's newest token to its Job and marks the row done (generate then pads it), and the Job resolves at once,
not when the batch ends. Rows are only grouped when one GenerationConfig serves them all (same greedy or
sampling settings, no repetition penalty, which would also count the left padding).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from sftflow.infer.batch import kv_bytes_per_token, memory_budget

if TYPE_CHECKING:
    from sftflow.infer.requests import Job, SamplingParams

logger = logging.getLogger(__name__)


class DynamicPath:
    """Groups waiting jobs into batches that fit `serve_max_batch_tokens` (prompt tokens of the first
    forward pass) and `serve_memory_fraction` of the free memory (the batch's KV cache), and runs them."""

    def __init__(self, engine: Any) -> None:  # the ChatEngine
        self.engine = engine
        self.cache_budget = memory_budget(engine.model, engine.generating.serve_memory_fraction)
        self.token_bytes = kv_bytes_per_token(engine.model)
        self.largest_batch = 0  # rows of the largest batch run so far
        self.regroups = 0  # batches stopped early to let waiting jobs join
        self.prefixes: dict[tuple[int, ...], Any] = {}  # shared prompt prefix -> its KV cache (1 row)
        self.reuse_prefixes = True
        logger.info(
            "dynamic batching: up to %d prompt tokens per batch, KV cache up to %.0f MB",
            engine.generating.serve_max_batch_tokens,
            self.cache_budget / 2**20,
        )

    def can_carry(self, params: SamplingParams) -> bool:
        """False for what needs a request of its own (the exact path): grammars, logprobs, echo, a seed,
        beam search, or a repetition penalty (it would count the padding of other rows)."""
        g = self.engine.generating
        if params.logprobs or params.top_logprobs or params.grammar or params.echo or params.seed is not None:
            return False
        if g.repetition_penalty != 1.0:
            return False
        return g.num_beams == 1 or self.engine.sampling(params)[0]

    def key(self, job: Job) -> tuple[bool, float, float] | tuple[bool]:
        """Jobs with equal keys share one GenerationConfig."""
        do_sample, temperature, top_p = self.engine.sampling(job.params)
        return (do_sample, temperature, top_p) if do_sample else (False,)

    def fits(self, rows: int, longest_prompt: int, longest_answer: int) -> bool:
        """Whether `rows` requests padded to these lengths may share a batch (one request always may)."""
        g = self.engine.generating
        if rows == 1:
            return True
        if rows * longest_prompt > g.serve_max_batch_tokens:
            return False
        if longest_prompt + longest_answer > self.engine.context_length:
            return False  # the padded batch would run past the model's positions
        kept = sum(len(prefix) for prefix in self.prefixes) * self.token_bytes  # the cached prefixes
        return rows * (longest_prompt + longest_answer) * self.token_bytes <= self.cache_budget - kept

    def take(self, first: Job, waiting: deque[Job]) -> list[Job]:
        """`first` and the waiting jobs (in arrival order) that can share its batch; they leave `waiting`."""
        key = self.key(first)
        group = [first]
        prompt, answer = len(ids_so_far(first)), tokens_left(first)
        for job in list(waiting):
            if job.done or not self.can_carry(job.params) or self.key(job) != key:
                continue
            p, a = max(prompt, len(ids_so_far(job))), max(answer, tokens_left(job))
            if not self.fits(len(group) + 1, p, a):
                break  # later jobs wait for the next batch: arrival order is kept
            group.append(job)
            waiting.remove(job)
            prompt, answer = p, a
        return group

    def should_regroup(self, jobs: list[Job], live: list[bool], waiting: deque[Job]) -> bool:
        """Whether to stop this batch so that waiting jobs join the live rows in a new one: every waiting
        job can join, they are at least as many as the live rows and that many fit, and the live rows
        still have REGROUP_MIN_LEFT tokens to go. The live rows then re-read their prompt + answer so
        far in the new batch's first pass."""
        rows = [job for job, alive in zip(jobs, live, strict=True) if alive]
        if not rows or max(tokens_left(job) for job in rows) < REGROUP_MIN_LEFT:
            return False
        key = self.key(rows[0])
        waiting_now = [j for j in waiting if not j.done]
        joining = [j for j in waiting_now if self.can_carry(j.params) and self.key(j) == key]
        if len(joining) < len(rows) or len(joining) < len(waiting_now):
            return False  # too few to be worth it, or a job that cannot join would wait longer still
        added = joining[: len(rows)]  # the regroup must at least double the batch
        prompt = max(len(ids_so_far(job)) for job in [*rows, *added])
        answer = max(tokens_left(job) for job in [*rows, *added])
        return self.fits(len(rows) + len(added), prompt, answer)

    def run(self, jobs: list[Job], waiting: deque[Job] | None = None, drain: Any = None) -> list[Job]:
        """Generate the batch; each job resolves as soon as its own row ends. With `waiting` (and `drain`,
        which moves newly queued jobs into it), the batch may stop early to let waiting jobs join: the
        jobs still unanswered then are returned, to run again in the next batch."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        engine, outer = self.engine, self
        live = [not job.done for job in jobs]
        self.largest_batch = max(self.largest_batch, len(jobs))
        regroup = [False]

        class Rows(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if regroup[0]:  # a step generate ran after the stop (deferred checks): not fed
                    return torch.ones(len(jobs), dtype=torch.bool, device=input_ids.device)
                newest = input_ids[:, -1].tolist()
                for i, job in enumerate(jobs):
                    if not live[i]:
                        continue
                    if job.cancelled.is_set() or job.done:
                        live[i] = False
                    elif job.feed([newest[i]]) or job.count >= job.max_new_tokens:
                        live[i] = False
                        job.finish()  # answered now, while the other rows go on
                if waiting is not None and any(live):
                    if drain is not None:
                        drain()
                    regroup[0] = outer.should_regroup(jobs, live, waiting)
                if regroup[0]:
                    return torch.ones(len(jobs), dtype=torch.bool, device=input_ids.device)
                return torch.tensor([not alive for alive in live], device=input_ids.device)

        prompts = [ids_so_far(job) for job in jobs]
        budget = max(tokens_left(job) for job in jobs)
        config = engine.generation_config(jobs[0].params, budget, streaming=True)
        if budget > 0 and any(live):
            with torch.inference_mode():
                prefix, cache = self.prefix_cache(prompts, len(jobs))
                # each row: the shared prefix (its KV computed once), padding, then the row's own tokens
                rest = [ids[len(prefix) :] for ids in prompts]
                longest = max(len(ids) for ids in rest)
                pad = engine.tokenizer.pad_token_id
                pad = pad if pad is not None else engine.stop_ids[0]
                device = engine.model.device
                input_ids = torch.tensor(
                    [prefix + [pad] * (longest - len(ids)) + ids for ids in rest], device=device
                )
                attention_mask = torch.tensor(
                    [[1] * len(prefix) + [0] * (longest - len(ids)) + [1] * len(ids) for ids in rest],
                    device=device,
                )
                engine.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([Rows()]),
                    **({"cache": cache} if cache is not None else {}),
                )
        if regroup[0]:
            self.regroups += 1
            return [job for job, alive in zip(jobs, live, strict=True) if alive and not job.done]
        for job in jobs:
            job.finish()
        return []

    def prefix_cache(self, prompts: list[list[int]], rows: int) -> tuple[list[int], Any]:
        """The longest cached prefix every prompt shares (else, for 2+ prompts, their common prefix,
        computed and cached now) and a copy of its KV cache repeated for `rows` rows; ([], None) when
        the prompts share fewer than PREFIX_MIN tokens or this model's cache cannot be reused. Chat
        prompts mostly share the template's system prompt (SmolLM2: 24 of ~40 tokens), whose KV every
        batch would recompute."""
        import copy

        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if not self.reuse_prefixes or getattr(
            self.engine.model.generation_config, "cache_implementation", None
        ):
            return [], None  # a model that asks for its own cache type gets it
        shortest = min(len(ids) for ids in prompts)  # every row keeps >= 1 token of its own to read
        best: tuple[int, ...] = ()
        for prefix in self.prefixes:
            if len(best) < len(prefix) < shortest and all(
                tuple(ids[: len(prefix)]) == prefix for ids in prompts
            ):
                best = prefix
        if not best and len(prompts) < 2:
            return [], None  # one prompt alone tells nothing about what others share
        if not best:
            common = 0
            while common < shortest - 1 and all(ids[common] == prompts[0][common] for ids in prompts):
                common += 1
            common = min(common, PREFIX_MAX)  # identical prompts (sampled n) share all but one token
            if common < PREFIX_MIN:
                return [], None
            best = tuple(prompts[0][:common])
            cache = DynamicCache(config=self.engine.model.config)
            ids = torch.tensor([list(best)], device=self.engine.model.device)
            self.engine.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            if not all(type(layer) is DynamicLayer for layer in cache.layers):
                self.reuse_prefixes = False  # sliding windows, linear attention: no reuse
                return [], None
            self.prefixes[best] = cache
            while len(self.prefixes) > PREFIX_CACHE_SIZE:
                self.prefixes.pop(next(iter(self.prefixes)))  # the least recently used
        self.prefixes[best] = self.prefixes.pop(best)  # most recently used last
        cache = copy.deepcopy(self.prefixes[best])
        cache.batch_repeat_interleave(rows)
        return list(best), cache


# A prefix shorter than PREFIX_MIN is recomputed with each batch; at most PREFIX_CACHE_SIZE prefixes of at
# most PREFIX_MAX tokens are kept, and their KV counts against serve_memory_fraction (`fits`).
PREFIX_MIN = 16
PREFIX_MAX = 1024
PREFIX_CACHE_SIZE = 8

# Stopping a batch to let waiting jobs in costs a forward pass over the live rows' prompts and answers so
# far: on CPU a prompt token costs about what a decode step of 16 rows costs / 40 (SmolLM2-135M), so a
# regroup on every early finish cut requests/s by ~20% (benchmarks/api_load.py, concurrency 4 and 16,
# 32-token answers). It is kept for long answers, where a newcomer would otherwise wait for minutes.
REGROUP_MIN_LEFT = 64


def ids_so_far(job: Job) -> list[int]:
    """The prompt and the tokens generated so far: what a job's row starts from (again) in a batch."""
    return job.prompt_ids + job.answer


def tokens_left(job: Job) -> int:
    return job.max_new_tokens - job.count
