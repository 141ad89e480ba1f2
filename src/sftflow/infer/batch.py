"""The continuous path (`serve_batching: continuous`): transformers' continuous batching behind a
ChatEngine. One ContinuousBatchingManager (paged KV cache sized by `cache_sizes`, never the library
default) runs every request it can carry; a dispatcher thread routes each request's tokens to its Job and
drops a cancelled request's late tokens.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    from sftflow.config import GeneratingArguments
    from sftflow.infer.requests import Job, SamplingParams

logger = logging.getLogger(__name__)

SERVING_ATTENTION = "sdpa"  # continuous batching refuses sftflow_sdpa; eager + concurrent forwards is wrong


class BatchPath:
    """Continuous batching: a transformers ContinuousBatchingManager fed by jobs, and a dispatcher thread
    that routes each request's tokens to its job (and drops a cancelled request's late tokens)."""

    def __init__(self, engine: Any) -> None:  # the ChatEngine
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.engine = engine
        g = engine.generating
        model = engine.model
        if model.config._attn_implementation != SERVING_ATTENTION:
            model.set_attn_implementation(SERVING_ATTENTION)
        vocab = model.get_input_embeddings().weight.shape[0]
        # do_sample for every request: a greedy request asks for top_k=1 (argmax), a sampled one for its
        # temperature / top_p; the manager creates a per-request processor only for keys set here.
        config = GenerationConfig(
            do_sample=True,
            temperature=g.temperature if g.temperature != 1.0 else 0.999999,
            top_p=g.top_p,
            top_k=g.top_k if g.top_k > 0 else vocab,
            repetition_penalty=g.repetition_penalty,
            max_new_tokens=g.max_new_tokens,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
        sizes = cache_sizes(model, g, engine.context_length)
        self.sizes = sizes
        cb = ContinuousBatchingConfig(
            page_size=sizes["page_size"],
            num_blocks=sizes["num_blocks"],
            max_batch_tokens=sizes["max_batch_tokens"],
            max_requests_per_batch=sizes["max_requests_per_batch"],
            per_request_processors=True,
            auto_switch_to_flash=False,
            allow_block_sharing=False,
        )
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        self.keys = set(self.manager.logit_processor.supported_keys)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.counter = 0
        self.running = True
        self.manager.start()
        self.thread = threading.Thread(target=self._dispatch, name="sftflow-batch", daemon=True)
        self.thread.start()
        logger.info(
            "continuous batching: %d KV blocks of %d tokens (%.0f MB), %d tokens per forward pass",
            sizes["num_blocks"],
            sizes["page_size"],
            sizes["cache_bytes"] / 2**20,
            sizes["max_batch_tokens"],
        )

    def can_carry(self, params: SamplingParams) -> bool:
        """False for what the manager cannot do per request (see the module docstring)."""
        g = self.engine.generating
        if params.logprobs or params.top_logprobs or params.grammar or params.echo or params.seed is not None:
            return False
        if g.repetition_penalty != 1.0:  # the manager would drop it silently
            return False
        do_sample, temperature, top_p = self.engine.sampling(params)
        if not do_sample:
            return "top_k" in self.keys and g.num_beams == 1
        needed = {"temperature"} | ({"top_p"} if top_p < 1 else set())
        return needed <= self.keys

    def add(self, job: Job) -> None:
        g = self.engine.generating
        do_sample, temperature, top_p = self.engine.sampling(job.params)
        kwargs: dict[str, Any] = {"top_k": 1} if not do_sample else {"temperature": temperature}
        if do_sample and "top_p" in self.keys:
            kwargs["top_p"] = top_p
        if do_sample and "top_k" in self.keys:
            kwargs["top_k"] = (
                g.top_k if g.top_k > 0 else self.manager.model.get_input_embeddings().num_embeddings
            )
        with self.lock:
            self.counter += 1
            request_id = f"sftflow-{self.counter}"
            self.jobs[request_id] = job

        def cancel() -> None:
            with self.lock:
                self.jobs.pop(request_id, None)  # late tokens of this request are dropped
            self.manager.cancel_request(request_id)

        job.on_cancel = cancel
        # token by token only when someone reads them (a stream) or stop strings must be watched for;
        # otherwise the manager sends the finished answer once (less work per step)
        streaming = job.events is not None or bool(job.params.stop)
        added = self.manager.add_request(
            job.prompt_ids,
            request_id=request_id,
            max_new_tokens=job.max_new_tokens,
            streaming=streaming,
            eos_token_id=self.engine.stop_ids,
            **kwargs,
        )
        if added is None:
            with self.lock:
                self.jobs.pop(request_id, None)
            raise SftflowError("the batch engine is not accepting requests (it is stopping).")

    def _dispatch(self) -> None:
        while self.running:
            output = self.manager.get_result(timeout=0.05)
            if output is None:
                continue
            with self.lock:
                job = self.jobs.get(output.request_id)
            if job is None:
                continue  # cancelled: its late outputs go nowhere
            finished = output.is_finished()
            if output.error is not None:
                self._forget(output.request_id)
                job.fail(SftflowError(f"generation failed: {output.error}"))
                continue
            stop = job.feed(list(output.generated_tokens[job.seen :]))
            if stop and not finished:
                self._forget(output.request_id)
                self.manager.cancel_request(output.request_id)
                job.finish()
            elif finished:
                self._forget(output.request_id)
                job.finish()

    def _forget(self, request_id: str) -> None:
        with self.lock:
            self.jobs.pop(request_id, None)

    @property
    def pending(self) -> int:
        """Requests whose tokens are still being routed (0 once every job finished or was cancelled)."""
        with self.lock:
            return len(self.jobs)

    def close(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel()
        self.manager.stop(block=True, timeout=10)
        self.running = False
        self.thread.join(timeout=5)


def cache_sizes(model: Any, generating: GeneratingArguments, context: int) -> dict[str, int]:
    """The paged KV cache of the batch path: `serve_memory_fraction` of the free memory (GPU memory on
    CUDA, available RAM on CPU), never more than `serve_max_queue` full-context requests need.

    Returns:
        page_size, num_blocks, max_batch_tokens, max_requests_per_batch and cache_bytes.
    """
    page_size = 64
    block_bytes = kv_bytes_per_token(model) * page_size
    budget = memory_budget(model, generating.serve_memory_fraction)
    blocks_per_request = math.ceil(context / page_size)
    wanted = generating.serve_max_queue * blocks_per_request
    num_blocks = max(min(budget // block_bytes, wanted), blocks_per_request)
    return {
        "page_size": page_size,
        "num_blocks": int(num_blocks),
        "max_batch_tokens": generating.serve_max_batch_tokens,
        "max_requests_per_batch": min(generating.serve_max_queue, generating.serve_max_batch_tokens),
        "cache_bytes": int(num_blocks * block_bytes),
    }


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of KV cache one token takes across every layer (keys and values)."""
    import torch

    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * itemsize


def memory_budget(model: Any, fraction: float) -> int:
    """`fraction` of the free memory where the model lives: GPU memory on CUDA, available RAM on CPU."""
    import psutil
    import torch

    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = psutil.virtual_memory().available
    return int(free * fraction)
