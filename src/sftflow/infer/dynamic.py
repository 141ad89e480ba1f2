"""The dynamic-batching path: requests join and leave a running batch at every decode step.

The batch is one left-padded KV cache (transformers' DynamicCache) decoded by plain forward passes. A
request that arrives mid-batch is read alone (its prompt only: the KV of a prompt prefix rows share is
reused) and its KV is padded on the left and stacked onto the running rows, which go on without
re-reading anything; a row that ends at a stop token, a stop string, its token budget or a cancel leaves
the batch at once and its Job resolves then. Padding columns are masked, so a row's tokens do not depend
on the rows it shares a batch with (greedy: equal to `generate`, tests/test_infer_dynamic.py).

Why not transformers' continuous batching: on CPU its paged-attention step costs about twice a plain
decode step at the same batch (SmolLM2-135M, 16 rows: ~0.24 s vs ~0.11 s; benchmarks/NOTES.md), so this
path keeps the plain step and does the joining itself. The cache operations it needs (and the cache's
size) are in infer/kv.py; the model, tokenizer and settings come from a `Generator` (infer/core.py).

Each row picks its token with its own settings: greedy, or sampled with its temperature / top_p and the
config's top_k (transformers' logits warpers). What needs more (grammars, logprobs, seeds, beams, a
repetition penalty) takes the exact path (infer/exact.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch
from torch.nn.functional import pad
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sftflow.infer import kv
from sftflow.infer.core import Generator, sampling
from sftflow.infer.requests import Job, SamplingParams

logger = logging.getLogger(__name__)


class Rows:
    """The running batch: its jobs, their KV cache and 2D attention mask (left padding is 0), each row's
    next position and the token it feeds next."""

    def __init__(
        self,
        jobs: list[Job],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ):
        self.jobs, self.cache, self.mask, self.positions, self.tokens = jobs, cache, mask, positions, tokens
        # plain layers can be padded, stacked and trimmed; sliding windows and linear attention cannot
        self.plain = kv.is_plain(cache)

    def keep(self, kept: list[int]) -> None:
        """Keep only the rows `kept` (indices), then drop the padding columns no kept row needs."""
        if not kept:
            self.jobs = []
            return
        if len(kept) < len(self.jobs):
            index = torch.tensor(kept, dtype=torch.long, device=self.mask.device)
            kv.select_rows(self.cache, index)
            self.jobs = [self.jobs[i] for i in kept]
            self.mask, self.positions, self.tokens = (
                self.mask[index],
                self.positions[index],
                self.tokens[index],
            )
        first = int(self.mask.any(0).int().argmax())  # the first column a row reads
        if first and self.plain:
            kv.trim_left(self.cache, first)
            self.mask = self.mask[:, first:]

    def add(self, other: Rows) -> None:
        """Stack `other`'s rows under these, padding the shorter side's KV and mask on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        kv.stack(self.cache, other.cache, width)
        self.mask = torch.cat(
            [
                pad(self.mask, (width - self.mask.shape[1], 0)),
                pad(other.mask, (width - other.mask.shape[1], 0)),
            ]
        )
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.jobs += other.jobs


class DynamicPath:
    """Admits waiting jobs into the running batch while they fit `serve_max_batch_tokens` (tokens one
    join reads) and `serve_memory_fraction` of the free memory (the batch's KV cache), and decodes it."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.cache_budget = kv.memory_budget(generator.model, generator.generating.serve_memory_fraction)
        self.token_bytes = kv.kv_bytes_per_token(generator.model)
        self.largest_batch = 0  # most rows decoded together so far
        self.joined = 0  # jobs that joined a batch already running
        # shared prompt prefix -> its KV cache (1 row)
        self.prefixes: dict[tuple[int, ...], DynamicCache] = {}
        self.reuse_prefixes = True
        self.joinable = True  # False for caches that cannot be padded and stacked (sliding windows, ...)
        logger.info(
            "dynamic batching: up to %d prompt tokens per join, KV cache up to %.0f MB",
            generator.generating.serve_max_batch_tokens,
            self.cache_budget / 2**20,
        )

    def can_carry(self, params: SamplingParams) -> bool:
        """False for what needs a request of its own (the exact path): grammars, logprobs, echo, a seed,
        beam search, or a repetition penalty."""
        g = self.generator.generating
        if params.logprobs or params.top_logprobs or params.grammar or params.echo or params.seed is not None:
            return False
        if g.repetition_penalty != 1.0:
            return False
        return g.num_beams == 1 or sampling(params, g)[0]

    def fits(
        self,
        rows: int,
        longest_prompt: int,
        longest_answer: int,
        reading: int | None = None,
        kept: bool = True,
    ) -> bool:
        """Whether `rows` requests padded to these lengths may share a batch whose joining pass reads
        `reading` tokens (default: rows x longest_prompt), next to the cached prefixes' KV (`kept`);
        one request alone always may."""
        g = self.generator.generating
        if rows == 1:
            return True
        if (reading if reading is not None else rows * longest_prompt) > g.serve_max_batch_tokens:
            return False
        if longest_prompt + longest_answer > self.generator.context_length:
            return False  # the padded batch would run past the model's positions
        prefixes = sum(len(prefix) for prefix in self.prefixes) * self.token_bytes if kept else 0
        return rows * (longest_prompt + longest_answer) * self.token_bytes <= self.cache_budget - prefixes

    def admit(self, rows: Rows | None, waiting: deque[Job]) -> list[Job]:
        """The waiting jobs that join now, from the front, in arrival order: up to the first one that
        cannot join (the exact path's, or one that does not fit), which the later ones wait behind."""
        if rows is not None and not self.joinable:
            return []
        live = rows.jobs if rows is not None else []
        width = rows.mask.shape[1] if rows is not None else 0
        answer = max((tokens_left(job) for job in live), default=0)
        group: list[Job] = []
        prompt = 0
        while waiting:
            job = waiting[0]
            if job.done or tokens_left(job) < 1:
                waiting.popleft().finish()  # (max_tokens 0: answered empty)
                continue
            if not self.can_carry(job.params):
                break
            p, a = max(prompt, len(job.prompt_ids)), max(answer, tokens_left(job))
            size = (len(live) + len(group) + 1, max(width, p), a, (len(group) + 1) * p)
            if (live or group) and not self.fits(*size):
                if self.prefixes and self.fits(*size, kept=False):
                    self.prefixes.pop(next(iter(self.prefixes)))  # cached prefixes make way for rows
                    continue
                break
            group.append(waiting.popleft())
            prompt, answer = p, a
        return group

    def serve(self, waiting: deque[Job], drain: Callable[[], None]) -> None:
        """Run batch jobs from the front of `waiting` until no row is left: before every step, `drain`
        moves newly queued jobs into `waiting` and those that can join do. A failure fails every job in
        the batch (and is raised)."""
        rows: Rows | None = None
        group: list[Job] = []
        try:
            with torch.inference_mode():
                while True:
                    drain()
                    if rows is not None and not rows.jobs:
                        rows = None  # every row ended: the next join starts a new batch
                    group = self.admit(rows, waiting)
                    if group:
                        joined = self.read(group)
                        if rows is not None and joined is not None:
                            self.joined += len(group)
                            rows.add(joined)
                        elif joined is not None:
                            rows = joined
                    group = []
                    if rows is None or not rows.jobs:
                        return
                    self.largest_batch = max(self.largest_batch, len(rows.jobs))
                    self.step(rows)
        except BaseException as exc:
            for job in [*group, *(rows.jobs if rows is not None else [])]:
                job.fail(exc)
            raise

    def read(self, jobs: list[Job]) -> Rows | None:
        """One pass over the prompts of `jobs` (left-padded; a cached shared prefix is not re-read): their
        first tokens, and their rows ready to decode (None if every one ended at its first token)."""
        generator = self.generator
        device = generator.model.device
        prompts = [job.prompt_ids for job in jobs]
        prefix, cache = self.prefix_cache(prompts, len(jobs))
        if cache is None:
            cache = kv.new_cache(generator.model)
        rest = [ids[len(prefix) :] for ids in prompts]
        longest = max(len(ids) for ids in rest)
        filler = generator.tokenizer.pad_token_id
        filler = filler if filler is not None else generator.stop_ids[0]
        input_ids = torch.tensor([[filler] * (longest - len(ids)) + ids for ids in rest], device=device)
        mask = torch.tensor(
            [[1] * len(prefix) + [0] * (longest - len(ids)) + [1] * len(ids) for ids in rest], device=device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix) :]
        tokens = self.choose(self.forward(input_ids, mask, positions, cache), jobs)
        rows = Rows(jobs, cache, mask, mask.sum(-1), tokens)
        self.joinable = self.joinable and rows.plain  # else a batch runs as it started
        rows.keep(self.fed(rows.jobs, tokens.tolist()))
        return rows if rows.jobs else None

    def step(self, rows: Rows) -> None:
        """One decode pass over the batch: every row reads its newest token and picks the next one;
        rows that end leave."""
        keep = [i for i, job in enumerate(rows.jobs) if not (job.done or job.cancelled.is_set())]
        rows.keep(keep)
        if not rows.jobs:
            return
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.jobs), 1)], dim=1)
        logits = self.forward(rows.tokens[:, None], rows.mask, rows.positions[:, None], rows.cache)
        rows.positions = rows.positions + 1
        rows.tokens = self.choose(logits, rows.jobs)
        rows.keep(self.fed(rows.jobs, rows.tokens.tolist()))

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """One pass that appends `input_ids` to `cache`; the logits of each row's last position."""
        out = self.generator.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def fed(self, jobs: list[Job], tokens: list[int]) -> list[int]:
        """Give each job its new token; the indices of the jobs that go on (the others are answered, or
        failed alone when their own decoding raises)."""
        going = []
        for i, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
            if job.cancelled.is_set() or job.done:
                continue
            try:
                ended = job.feed([token]) or job.count >= job.max_new_tokens
            except Exception as exc:
                logger.exception("decoding one row failed")
                job.fail(exc)
                continue
            if ended:
                job.finish()  # answered now, while the other rows go on
            else:
                going.append(i)
        return going

    def choose(self, logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """Each row's next token: the argmax, or a sample under its own temperature / top_p. Rows that
        share settings are sampled together; if that fails, each row is drawn alone and a row that still
        fails fails its own job only (it then leaves the batch: `fed` skips it)."""
        tokens = logits.argmax(-1)
        settings: dict[tuple[float, float], list[int]] = {}
        for i, job in enumerate(jobs):
            do_sample, temperature, top_p = sampling(job.params, self.generator.generating)
            if do_sample:
                settings.setdefault((temperature, top_p), []).append(i)
        for (temperature, top_p), index in settings.items():
            try:
                tokens[index] = self.draw(logits[index], temperature, top_p)
            except RuntimeError:
                for i in index:
                    try:
                        tokens[i] = self.draw(logits[i : i + 1], temperature, top_p)[0]
                    except RuntimeError as exc:
                        logger.warning("sampling failed for one row: %s", exc)
                        jobs[i].fail(exc)
        return tokens

    def draw(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """One sampled token per row of `logits` under these settings (and the config's top_k).

        Raises:
            RuntimeError: the warped scores are not a distribution (inf or nan).
        """
        scores = self.warper(temperature, top_p)(None, logits.float())
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1)

    def warper(self, temperature: float, top_p: float) -> LogitsProcessorList:
        """transformers' warpers for these settings (and the config's top_k), in generate's order."""
        top_k = self.generator.generating.top_k
        warpers: list[TemperatureLogitsWarper | TopKLogitsWarper | TopPLogitsWarper] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return LogitsProcessorList(warpers)

    def prefix_cache(self, prompts: list[list[int]], rows: int) -> tuple[list[int], DynamicCache | None]:
        """The longest cached prefix every prompt shares (else, for 2+ prompts, their common prefix,
        computed and cached now) and a copy of its KV cache repeated for `rows` rows; ([], None) when
        the prompts share fewer than PREFIX_MIN tokens or this model's cache cannot be reused. Chat
        prompts mostly share the template's system prompt (SmolLM2: 24 of ~40 tokens), whose KV every
        join would recompute."""
        model = self.generator.model
        if not self.reuse_prefixes or getattr(model.generation_config, "cache_implementation", None):
            return [], None  # a model that asks for its own cache type: no prefix reuse
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
            cache = kv.new_cache(model)
            ids = torch.tensor([list(best)], device=model.device)
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            if not kv.is_plain(cache):
                self.reuse_prefixes = False  # sliding windows, linear attention: no reuse
                return [], None
            self.prefixes[best] = cache
            while len(self.prefixes) > PREFIX_CACHE_SIZE:
                self.prefixes.pop(next(iter(self.prefixes)))  # the least recently used
        self.prefixes[best] = self.prefixes.pop(best)  # most recently used last
        return list(best), kv.repeated(self.prefixes[best], rows)


# A prefix shorter than PREFIX_MIN is recomputed with each join; at most PREFIX_CACHE_SIZE prefixes of at
# most PREFIX_MAX tokens are kept, and their KV counts against serve_memory_fraction (`fits`).
PREFIX_MIN = 16
PREFIX_MAX = 1024
PREFIX_CACHE_SIZE = 8


def tokens_left(job: Job) -> int:
    return job.max_new_tokens - job.count
