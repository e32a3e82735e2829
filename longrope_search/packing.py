"""Training blocks of the fine-tune: a token stream cut into rows, each document with its own positions.

Rows are consecutive slices of the stream (`data.TokenStream`), so no token is padding. Inside a row every
document (or the piece of one that the row holds) restarts at position 0 and never predicts across its start:
transformers 5 reads restarting `position_ids` without an attention mask as packed sequences and keeps them apart
(a block-diagonal causal mask under SDPA and eager, variable-length kernels under flash-attention 2).

A block is what one forward pass of one process takes: either `rows` long rows of the training length, which run
with the long factors, or as many rows of the original window as hold the same number of tokens, which run with
the short factors (transformers picks the set by the longest position in the batch). Short blocks are LongRoPE2's
mixed context window; `short_share` of the blocks are short, spread evenly over the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from longrope_search.data import TokenStream

IGNORE = -100  # a label the loss skips: the first token of each document in a row predicts nothing


@dataclass(frozen=True)
class Plan:
    """Which blocks are short, in training order, and where each starts in the stream."""

    length: int  # tokens of a long row: the training length
    short_length: int  # tokens of a short row: at most the original window
    rows: int  # long rows per block
    short: np.ndarray  # (B,) bool: the block is short
    offsets: np.ndarray  # (B+1,) int64: block b is stream[offsets[b]:offsets[b+1]]
    # False: positions run on across documents (context parallelism: PyTorch's ring attention is causal only, so the
    # documents of a row see each other, as in the paper's chunks bookended with BOS and EOS)
    separate: bool = True

    @property
    def short_rows(self) -> int:
        """Short rows per short block: the long block's tokens in rows of the short length (rounded down)."""
        return max(1, self.rows * self.length // self.short_length)

    @property
    def blocks(self) -> int:
        return len(self.short)

    @property
    def tokens(self) -> int:
        """Tokens of the stream the blocks cut."""
        return int(self.offsets[-1])

    @property
    def trained_tokens(self) -> int:
        """Tokens of every row of every block."""
        return int(sum(rows * n for rows, n in map(self.shape, range(self.blocks))))

    def shape(self, block: int) -> tuple[int, int]:
        """(rows, tokens per row) of one block."""
        return (self.short_rows, self.short_length) if self.short[block] else (self.rows, self.length)


def short_blocks(blocks: int, share: float) -> np.ndarray:
    """(blocks,) bool: `share` of them True, spread evenly (block b is short when floor((b+1) * share) grows), so every
    stretch of the run holds its share and no seed is needed."""
    index = np.arange(blocks)
    return np.floor((index + 1) * share + 1e-9) > np.floor(index * share + 1e-9)


def plan(blocks: int, length: int, short_length: int, rows: int = 1, short_share: float = 0.0,
         separate: bool = True) -> Plan:
    """`blocks` blocks of `rows` long rows of `length` tokens, `short_share` of them short (rows of `short_length`);
    `separate`: each document with its own positions."""
    short = short_blocks(blocks, short_share)
    long_tokens = rows * length
    short_tokens = max(1, long_tokens // short_length) * short_length
    sizes = np.where(short, short_tokens, long_tokens).astype(np.int64)  # (B,)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (B+1,)
    return Plan(length, short_length, rows, short, offsets, separate)


def row_positions(start: int, length: int, bounds: np.ndarray) -> np.ndarray:
    """(length,) positions of stream[start:start+length]: the distance to the start of each token's document, or to
    the row's start for the piece of a document begun in an earlier row."""
    index = np.arange(start, start + length)  # (n,) stream indices
    doc_start = bounds[np.searchsorted(bounds, index, side="right") - 1]  # (n,) where each token's document begins
    return index - np.maximum(doc_start, start)


def block(stream: TokenStream, layout: Plan, b: int) -> dict[str, torch.Tensor]:
    """Block b as model inputs: input_ids, position_ids and labels, each (rows, n), no attention mask (transformers
    derives the packed-sequence mask from the restarting positions)."""
    rows, n = layout.shape(b)
    start = int(layout.offsets[b])
    ids = np.asarray(stream.ids[start:start + rows * n], dtype=np.int64).reshape(rows, n)  # (rows, n)
    positions = np.stack([row_positions(start + r * n, n, stream.bounds) for r in range(rows)])  # (rows, n)
    labels = np.where(positions == 0, IGNORE, ids)  # (rows, n): a document's first token is predicted by no one
    if not layout.separate:
        positions = np.tile(np.arange(n), (rows, 1))  # one sequence per row: causal attention across it
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(positions.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


class PackedBlocks(torch.utils.data.Dataset):
    """The planned blocks in training order (a sequential sampler keeps the order, so a resume sees the same data)."""

    def __init__(self, stream: TokenStream, layout: Plan) -> None:
        if stream.ids.shape[0] < layout.tokens:
            raise ValueError(f"the stream holds {stream.ids.shape[0]} tokens but the plan needs {layout.tokens}")
        self.stream, self.layout = stream, layout

    def __len__(self) -> int:
        return self.layout.blocks

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        return block(self.stream, self.layout, b)


def one_block(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The data collator: a DataLoader batch of one block is that block (its rows are the batch)."""
    if len(items) != 1:
        raise ValueError(f"expected one block per batch, got {len(items)}")
    return items[0]


def longest_piece(start: int, length: int, bounds: np.ndarray) -> int:
    """Tokens of the longest document piece in stream[start:start+length] (its largest position + 1)."""
    lo, hi = np.searchsorted(bounds, start, side="right"), np.searchsorted(bounds, start + length, side="left")
    cuts = np.concatenate([[start], bounds[lo:hi], [start + length]])  # document starts inside the row
    return int(np.diff(cuts).max())


def long_rows_share(stream: TokenStream, layout: Plan) -> float:
    """Share of the long rows whose longest document piece exceeds the short length: the rows that really run the
    long factors (a row of short documents only runs the short ones, as the same input would at inference)."""
    starts = [int(layout.offsets[b]) + r * layout.length for b in np.flatnonzero(~layout.short) for r in range(layout.rows)]
    if not starts:
        return math.nan
    if not layout.separate:
        return 1.0  # positions run on over the whole row
    return sum(longest_piece(s, layout.length, stream.bounds) > layout.short_length for s in starts) / len(starts)
