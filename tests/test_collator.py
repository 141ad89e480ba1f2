"""Exact-tensor tests of padding for training (right) and generation (left)."""

from sftflow.data.collator import SftCollator

FEATURES = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7], "labels": [7]}]


def test_right_padding_pads_ids_with_pad_and_labels_with_ignore_index():
    batch = SftCollator(pad_token_id=2)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # the real eos (id 2 == pad id) keeps its label; padding does not
    assert batch["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]


def test_left_padding_for_generation_without_labels():
    batch = SftCollator(pad_token_id=0, padding_side="left")([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch


def test_pad_to_multiple_of():
    batch = SftCollator(pad_token_id=0, pad_to_multiple_of=4)(FEATURES)
    assert batch["input_ids"].shape == (2, 4) and batch["labels"][0].tolist() == [-100, 6, 2, -100]


def test_packed_collator_pads_with_a_block_of_its_own_and_no_attention_mask():
    from sftflow.data.collator import PackedCollator

    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
    ]
    batch = PackedCollator(pad_token_id=2)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
