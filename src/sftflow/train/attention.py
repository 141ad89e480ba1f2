"""Padding-free attention that costs each example only its own length.

The trained-token loss (`loss.py`) runs a batch as one flattened row of back-to-back examples. Plain sdpa
then attends over the whole row through a dense block-diagonal mask: (sum of lengths)^2 score entries per
head where the examples need only the sum of (length^2), and the mask rules out sdpa's causal fast path.
On the demo batches (4 examples, ~650 tokens) that was ~28% of a CPU training step.

`segment_sdpa` is registered with transformers' `AttentionInterface` (its documented hook for custom
attention, no model code patched) under the name `sftflow_sdpa`. When the call carries
`cu_seq_lens_q` (the flash-attention kwargs for packed sequences: where each example starts in the row),
it runs transformers' own sdpa with `is_causal=True` on each example (on CPU: one call per example, on
views of the row) or on the examples laid out as a right-padded batch (on accelerators: one call; a
right-padded key sits after every real query of its row, so the causal rule alone keeps examples apart
and padding out; the padded query rows are dropped). Without those kwargs (eval, generation, any
other batch) it is exactly transformers' sdpa, mask and all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


NAME = "sftflow_sdpa"

# Attention-call kwargs that change what the plain causal softmax computes; with any of them set the
# given (dense) mask is used instead.
_NOT_PLAIN = ("sliding_window", "softcap", "s_aux", "position_bias")


def segment_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' sdpa attention, per example when `cu_seq_lens_q` marks examples in one flattened row.

    Shapes as transformers passes them: query (1, heads, T, d), key/value (1, kv_heads, T, d); returns
    (1, T, heads, d) like `sdpa_attention_forward`.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    max_length = kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    causal = kwargs.pop("is_causal", None)
    plain = (
        starts is not None
        and query.shape[0] == 1
        and key.shape[2] == query.shape[2]  # no KV cache
        and (causal if causal is not None else getattr(module, "is_causal", True))
        and getattr(module, "sliding_window", None) is None
        and all(kwargs.get(name) is None for name in _NOT_PLAIN)
    )
    if not plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=causal,
            **kwargs,
        )
    if per_example_calls(query):
        # One causal sdpa call per example on views of the row: costs sum(length^2), nothing on padding.
        lengths = (starts[1:] - starts[:-1]).tolist()
        pieces = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
        outs = [
            sdpa_attention_forward(
                module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs
            )[0]
            for q, k, v in pieces
        ]
        return torch.cat(outs, dim=1), None
    # On accelerators one batched call over the right-padded layout beats many small kernel launches.
    gather, scatter, rows, width = segment_index(starts, max_length, total=query.shape[2])
    heads, dim = query.shape[1], query.shape[3]

    def padded(x: torch.Tensor) -> Any:  # (1, h, T, d) -> (rows, h, width, d)
        return x[0].index_select(1, gather).view(x.shape[1], rows, width, dim).transpose(0, 1)

    out, _ = sdpa_attention_forward(
        module,
        padded(query),
        padded(key),
        padded(value),
        None,
        dropout=dropout,
        scaling=scaling,
        is_causal=True,
        **kwargs,
    )  # (rows, width, heads, d)
    return out.reshape(rows * width, heads, dim).index_select(0, scatter).unsqueeze(0), None


def per_example_calls(query: torch.Tensor) -> bool:
    """One sdpa call per example (CPU: no FLOP on padding, calls are cheap) or one batched call over a
    right-padded layout (accelerators, where each call is a kernel launch)."""
    return query.device.type == "cpu"


def segment_index(
    starts: torch.Tensor, max_length: int | None = None, total: int | None = None
) -> tuple[Any, Any, int, int]:
    """Indices between a flattened row and its right-padded (rows, width) layout.

    `starts` holds the cumulative example boundaries [0, s1, s1+s2, ..., T]. Returns `gather` (rows *
    width positions of the flattened row; padding repeats the row's last token, which no real query can
    see under the causal rule), `scatter` (for each of the T tokens its place in the padded layout), rows
    and width. Given `max_length` and `total` (T), nothing waits on the device.

    >>> import torch
    >>> gather, scatter, rows, width = segment_index(torch.tensor([0, 3, 5]))
    >>> gather.view(rows, width).tolist(), scatter.tolist()
    ([[0, 1, 2], [3, 4, 4]], [0, 1, 2, 3, 4])
    """
    import torch

    starts = starts.to(torch.long)
    lengths = starts[1:] - starts[:-1]
    rows = int(lengths.numel())
    width = int(max_length) if max_length is not None else int(lengths.max())
    offsets = torch.arange(width, device=starts.device)
    gather = (starts[:-1, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)).reshape(-1)
    total = int(starts[-1]) if total is None else total
    row_of = torch.repeat_interleave(torch.arange(rows, device=starts.device), lengths, output_size=total)
    scatter = row_of * width + torch.arange(total, device=starts.device) - starts[:-1][row_of]
    return gather, scatter, rows, width


def sequence_starts(position_ids: torch.Tensor) -> tuple[Any, int]:
    """`cu_seq_lens` and the longest example of a flattened row, read from its position ids: an example
    starts wherever the position does not follow on from the previous one (as transformers reads packed
    rows).

    >>> import torch
    >>> starts, longest = sequence_starts(torch.tensor([[0, 1, 2, 0, 1]]))
    >>> starts.tolist(), longest
    ([0, 3, 5], 3)
    """
    import torch

    positions = position_ids[0]
    new = torch.ones_like(positions, dtype=torch.bool)
    new[1:] = positions[1:] != positions[:-1] + 1
    bounds = torch.cat([new.nonzero().squeeze(1), positions.new_tensor([positions.numel()])])
    bounds = bounds.to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def register() -> None:
    """Make `sftflow_sdpa` known to transformers (attention and mask: the mask is sdpa's)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, segment_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def segment_attention(model: nn.Module) -> Iterator[bool]:
    """Run a model that uses transformers' sdpa on `sftflow_sdpa` inside the block, then put sdpa back.

    Results are the same as sdpa's; only padding-free rows that carry `cu_seq_lens_q` cost less. Models
    on eager or flash attention, or whose class does not take the attention interface, are left as they
    are. Yields whether the switch was made.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    switch = (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(type(base), "_supports_attention_backend", False)
        and hasattr(base, "set_attn_implementation")
    )
    if switch:
        register()
        try:
            base.set_attn_implementation(NAME)
        except (ValueError, KeyError, ImportError):
            switch = False
    try:
        yield switch
    finally:
        if switch:
            base.set_attn_implementation("sdpa")


def uses_segment_attention(model: nn.Module) -> bool:
    """Whether the (possibly DDP/PEFT-wrapped) model runs `sftflow_sdpa`."""
    inner = model
    for attr in ("module", "base_model", "model"):
        config = getattr(inner, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config._attn_implementation == NAME
        inner = getattr(inner, attr, inner)
    return False
