"""Packing for the fine-tune: rows cut from the stream with per-document positions and labels, short blocks spread
evenly, and transformers keeping the documents of a row apart (one document cannot attend to another)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from longrope_search import packing
from longrope_search.data import TokenStream

pytestmark = pytest.mark.usefixtures("one_thread")


def stream_of(*lengths: int, start: int = 10) -> TokenStream:
    """Documents of the given lengths; document d holds the ids start + 100 d + i, so a token names its document."""
    docs = [np.arange(n, dtype=np.int32) + start + 100 * d for d, n in enumerate(lengths)]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenStream(np.concatenate(docs), bounds, len(lengths))


def test_short_blocks_hold_their_share_in_every_stretch_of_the_run():
    for share in (0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0):
        short = packing.short_blocks(120, share)
        assert short.sum() == round(120 * share)
        for start in range(0, 120, 12):  # any 12 consecutive blocks hold within one of their share
            assert abs(short[start:start + 12].sum() - 12 * share) <= 1
    assert packing.short_blocks(4, 0.5).tolist() == [False, True, False, True]


def test_a_plan_cuts_long_and_short_blocks_of_equal_tokens_from_the_stream():
    layout = packing.plan(blocks=4, length=64, short_length=16, rows=2, short_share=0.5)
    assert layout.short.tolist() == [False, True, False, True]
    assert [layout.shape(b) for b in range(4)] == [(2, 64), (8, 16), (2, 64), (8, 16)]
    assert layout.offsets.tolist() == [0, 128, 256, 384, 512] and layout.tokens == 512
    # a window that does not divide the length: the short block holds as many whole short rows as fit
    odd = packing.plan(blocks=2, length=100, short_length=30, short_share=1.0)
    assert odd.shape(0) == (3, 30) and odd.tokens == 180


def test_positions_restart_at_each_document_and_no_label_crosses_a_boundary():
    stream = stream_of(5, 3, 9)  # documents at [0, 5), [5, 8), [8, 17)
    layout = packing.plan(blocks=2, length=8, short_length=5)
    first, second = (packing.block(stream, layout, b) for b in range(2))
    assert first["input_ids"].tolist() == [[10, 11, 12, 13, 14, 110, 111, 112]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert first["labels"].tolist() == [[-100, 11, 12, 13, 14, -100, 111, 112]]
    # the second row continues document 2 from position 0: a piece of a document is a document of its own
    assert second["input_ids"].tolist() == [[210, 211, 212, 213, 214, 215, 216, 217]]
    assert second["position_ids"].tolist() == [list(range(8))]
    assert second["labels"][0, 0] == -100 and second["labels"][0, 1:].tolist() == list(range(211, 218))
    assert packing.longest_piece(0, 8, stream.bounds) == 5 and packing.longest_piece(8, 8, stream.bounds) == 8
    assert packing.long_rows_share(stream, layout) == 0.5  # only the second row holds a piece longer than 5


def test_the_dataset_serves_planned_blocks_in_order_and_refuses_a_short_stream():
    stream = stream_of(40, 40)
    layout = packing.plan(blocks=3, length=16, short_length=8, short_share=1 / 3)
    blocks = packing.PackedBlocks(stream, layout)
    assert len(blocks) == 3 and [tuple(blocks[b]["input_ids"].shape) for b in range(3)] == [(1, 16), (1, 16), (2, 8)]
    assert packing.one_block([blocks[2]]) is not None
    with pytest.raises(ValueError, match="holds 80 tokens but the plan needs 96"):
        packing.PackedBlocks(stream, packing.plan(blocks=6, length=16, short_length=8))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_document_in_a_packed_row_cannot_attend_to_another(attention):
    """The row's logits for each document equal that document's logits alone, whatever the other documents hold:
    transformers reads the restarting position_ids (no attention mask, no cache) as separate sequences."""
    model = tiny_model("llama", vocab_size=320, max_position_embeddings=64)
    model.config._attn_implementation = attention
    model.config.use_cache = False  # as the fine-tune sets it: a cache would switch the packed mask off
    rng = np.random.default_rng(0)
    lengths = (7, 11, 6)
    stream = TokenStream(rng.integers(3, 320, sum(lengths)).astype(np.int32),
                         np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), 3)
    row = packing.block(stream, packing.plan(1, sum(lengths), 8), 0)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]  # (24, V)
        for d, (a, b) in enumerate(zip(stream.bounds[:-1], stream.bounds[1:])):
            alone = model(input_ids=torch.as_tensor(stream.ids[a:b], dtype=torch.long)[None]).logits[0]  # (n, V)
            assert torch.allclose(packed[a:b], alone, atol=1e-5), (attention, d)
        # changing the first two documents leaves the third one's logits exactly as they were
        other = row["input_ids"].clone()
        other[0, :18] = torch.as_tensor(rng.integers(3, 320, 18))
        changed = model(input_ids=other, position_ids=row["position_ids"]).logits[0]
    assert torch.allclose(changed[18:], packed[18:], atol=1e-6)
    assert not torch.allclose(changed[:18], packed[:18], atol=1e-3)


def test_under_context_parallelism_positions_run_on_over_the_row():
    stream = stream_of(5, 11)
    layout = packing.plan(blocks=1, length=16, short_length=4, separate=False)
    row = packing.block(stream, layout, 0)
    assert row["position_ids"].tolist() == [list(range(16))]  # the ring attention is causal only: one sequence
    assert row["labels"][0, 5] == -100  # still no prediction of the next document's first token
    assert packing.long_rows_share(stream, layout) == 1.0
