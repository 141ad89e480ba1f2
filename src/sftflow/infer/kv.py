"""Every use of the KV cache by the serving paths, behind named operations: its size (bytes per token,
the memory budget), the changes the dynamic path makes to a transformers `DynamicCache` (select rows,
drop leading padding columns, stack a joiner's rows under the batch, repeat a cached prefix) and the
attention implementation the model serves with.

These operations rely on DynamicCache's layout: `cache.layers` is a list of `DynamicLayer`, each with
`keys` and `values` tensors shaped [batch, kv heads, sequence, head dim], and `batch_select_indices` /
`batch_repeat_interleave` on the batch dimension. tests/test_infer_kv.py fails, naming the transformers
version, if that layout changes. Layers of other types (sliding windows, linear attention) are not
"plain": their caches cannot be stacked or trimmed, and the dynamic path does not try.
"""

from __future__ import annotations

import copy

import psutil
import torch
from torch.nn.functional import pad
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

# The attention the served model runs, whatever the run trained with. Chosen for transformers' continuous
# batching (removed), which refused training's sftflow_sdpa; the dynamic path's tests (greedy batches ==
# `generate`) run under it.
SERVING_ATTENTION = "sdpa"


def attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation `model` runs (transformers keeps it in a private config field)."""
    return model.config._attn_implementation


def use_serving_attention(model: PreTrainedModel) -> None:
    """Switch `model` to SERVING_ATTENTION unless it runs it already."""
    if attention_implementation(model) != SERVING_ATTENTION:
        model.set_attn_implementation(SERVING_ATTENTION)


# -- sizes ----------------------------------------------------------------------------------------


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of KV cache one token takes across every layer (keys and values)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * itemsize


def memory_budget(model: PreTrainedModel, fraction: float) -> int:
    """`fraction` of the free memory where the model lives: GPU memory on CUDA, available RAM on CPU."""
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = psutil.virtual_memory().available
    return int(free * fraction)


# -- the cache ------------------------------------------------------------------------------------


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty cache for `model` (its layer types come from the model's config)."""
    return DynamicCache(config=model.config)


def is_plain(cache: DynamicCache) -> bool:
    """Whether every layer is a plain DynamicLayer, which the operations below can pad, stack and trim."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def select_rows(cache: DynamicCache, index: torch.Tensor) -> None:
    """Keep only the rows `index` (a long tensor of row numbers, in the order kept)."""
    cache.batch_select_indices(index)


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first `columns` positions of every layer (padding no row reads any more)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


def stack(cache: DynamicCache, other: DynamicCache, width: int) -> None:
    """Put `other`'s rows under `cache`'s, both left-padded with zeros to `width` positions."""
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        for name in ("keys", "values"):
            a, b = getattr(mine, name), getattr(theirs, name)
            a = pad(a, (0, 0, width - a.shape[2], 0))
            b = pad(b, (0, 0, width - b.shape[2], 0))
            setattr(mine, name, torch.cat([a, b]))


def repeated(cache: DynamicCache, rows: int) -> DynamicCache:
    """A copy of a one-row cache with that row repeated `rows` times (`cache` is left as it is)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out
