"""infer/kv.py: the KV-cache operations of the dynamic path, exact on small tensors, and the layout of
transformers' DynamicCache they rely on (a failure here names the transformers version and what changed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.cache_utils import DynamicLayer

from sftflow.infer import kv

HEADS, HEAD_DIM, LAYERS = 2, 4, 2  # kv heads; 16 hidden / 4 attention heads


def changed(what: str) -> str:
    return f"transformers {transformers.__version__} changed the DynamicCache layout infer/kv.py relies on: {what}"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def filled(rows: int, length: int, start: float = 0.0) -> DynamicCache:
    """A plain cache whose entries count up from `start` (keys) and are their negatives (values), so that
    every position of every row is told apart."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.arange(rows * HEADS * length * HEAD_DIM, dtype=torch.float32) + start + 1000 * layer
        keys = keys.reshape(rows, HEADS, length, HEAD_DIM)
        cache.update(keys, -keys, layer)
    return cache


# -- the layout ------------------------------------------------------------------------------------


def test_a_models_cache_is_a_list_of_plain_layers_shaped_batch_heads_seq_dim(model):
    cache = kv.new_cache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, use_cache=True)
    assert isinstance(cache.layers, list), changed(
        f"cache.layers is a {type(cache.layers).__name__}, not a list"
    )
    assert len(cache.layers) == LAYERS, changed(f"{len(cache.layers)} layers for a {LAYERS}-layer model")
    for layer in cache.layers:
        assert type(layer) is DynamicLayer, changed(f"a full-attention layer is a {type(layer).__name__}")
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            assert isinstance(tensor, torch.Tensor), changed(f"a layer has no `{name}` tensor")
            assert tuple(tensor.shape) == (2, HEADS, 3, HEAD_DIM), changed(
                f"layer.{name} is shaped {tuple(tensor.shape)}, not [batch 2, heads {HEADS}, seq 3, dim {HEAD_DIM}]"
            )
    assert kv.is_plain(cache)


def test_the_cache_reads_the_layers_it_holds():
    """The operations replace `layer.keys` / `layer.values`; the next forward must read the new tensors."""
    cache = filled(1, 3)
    cache.layers[0].keys = cache.layers[0].keys[:, :, 1:]
    cache.layers[0].values = cache.layers[0].values[:, :, 1:]
    assert cache.layers[0].get_seq_length() == 2, changed("a layer's length is not read from its keys")
    keys, _ = cache.update(torch.zeros(1, HEADS, 1, HEAD_DIM), torch.zeros(1, HEADS, 1, HEAD_DIM), 0)
    assert keys.shape[2] == 3, changed("update() does not append to the layer's replaced keys")


def test_batch_select_and_repeat_work_on_the_batch_dimension():
    cache = filled(3, 2)
    rows = [layer.keys.clone() for layer in cache.layers]
    assert hasattr(cache, "batch_select_indices"), changed("DynamicCache.batch_select_indices is gone")
    assert hasattr(cache, "batch_repeat_interleave"), changed("DynamicCache.batch_repeat_interleave is gone")
    cache.batch_select_indices(torch.tensor([2, 0]))
    for layer, before in zip(cache.layers, rows, strict=True):
        assert torch.equal(layer.keys, before[[2, 0]]), changed("batch_select_indices does not pick rows")
        assert torch.equal(layer.values, -before[[2, 0]])


def test_sliding_window_layers_are_not_plain():
    config = MistralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        sliding_window=4,
    )
    cache = DynamicCache(config=config)
    assert cache.layers and not any(type(layer) is DynamicLayer for layer in cache.layers), changed(
        "a sliding-window model's cache now holds plain DynamicLayers (or no layers before a forward)"
    )
    assert not kv.is_plain(cache)


# -- the operations, exact -------------------------------------------------------------------------


def test_select_rows_keeps_the_rows_in_the_given_order():
    cache, want = filled(3, 2), filled(3, 2)
    kv.select_rows(cache, torch.tensor([2, 0]))
    for got, full in zip(cache.layers, want.layers, strict=True):
        assert torch.equal(got.keys, full.keys[[2, 0]]) and torch.equal(got.values, full.values[[2, 0]])


def test_trim_left_drops_the_first_columns_of_every_layer():
    cache, want = filled(2, 5), filled(2, 5)
    kv.trim_left(cache, 2)
    for got, full in zip(cache.layers, want.layers, strict=True):
        assert got.keys.shape == (2, HEADS, 3, HEAD_DIM)
        assert torch.equal(got.keys, full.keys[:, :, 2:]) and torch.equal(got.values, full.values[:, :, 2:])


def test_stack_left_pads_both_caches_with_zeros_and_puts_the_joiner_below():
    batch, joiner = filled(2, 3), filled(1, 5, start=0.5)
    want_batch, want_joiner = filled(2, 3), filled(1, 5, start=0.5)
    kv.stack(batch, joiner, 6)
    for i, (got, mine, theirs) in enumerate(
        zip(batch.layers, want_batch.layers, want_joiner.layers, strict=True)
    ):
        assert got.keys.shape == (3, HEADS, 6, HEAD_DIM)
        for name, sign in (("keys", 1), ("values", -1)):
            tensor = getattr(got, name)
            assert torch.equal(tensor[:2, :, :3], torch.zeros(2, HEADS, 3, HEAD_DIM))  # 3 padding columns
            assert torch.equal(tensor[:2, :, 3:], getattr(mine, name))
            assert torch.equal(tensor[2:, :, :1], torch.zeros(1, HEADS, 1, HEAD_DIM))  # 1 padding column
            assert torch.equal(tensor[2:, :, 1:], getattr(theirs, name))
            assert sign * tensor[2, 0, 1, 0] == 0.5 + 1000 * i  # the joiner's first entry


def test_repeated_copies_one_row_and_leaves_the_original():
    prefix = filled(1, 4)
    out = kv.repeated(prefix, 3)
    assert prefix.layers[0].keys.shape[0] == 1  # the cached prefix stays one row
    for got, one in zip(out.layers, prefix.layers, strict=True):
        assert torch.equal(got.keys, one.keys.expand(3, -1, -1, -1))
        assert torch.equal(got.values, one.values.expand(3, -1, -1, -1))
    out.layers[0].keys[0, 0, 0, 0] = 123.0
    assert prefix.layers[0].keys[0, 0, 0, 0] == 0.0  # a copy, not a view


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer(model):
    assert kv.kv_bytes_per_token(model) == 2 * LAYERS * HEADS * HEAD_DIM * 4  # float32
    half = LlamaForCausalLM(model.config).to(torch.bfloat16)
    assert kv.kv_bytes_per_token(half) == 2 * LAYERS * HEADS * HEAD_DIM * 2


def test_memory_budget_is_the_fraction_of_available_ram_on_cpu(model, monkeypatch):
    monkeypatch.setattr(kv.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    assert kv.memory_budget(model, 0.25) == 250


def test_serving_attention_is_read_and_set_in_one_place():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        attn_implementation="eager",
    )
    eager = LlamaForCausalLM(config)
    assert kv.attention_implementation(eager) == "eager"
    kv.use_serving_attention(eager)
    assert kv.attention_implementation(eager) == kv.SERVING_ATTENTION == "sdpa"
