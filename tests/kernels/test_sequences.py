"""Chunk indices of packed sequences: the dense shortcut equals the general construction."""

import pytest
import torch

from seqmix.kernels.sequences import dense_chunking, make_chunking


@pytest.mark.parametrize("batch, seqlen, chunk", [(1, 1, 64), (3, 64, 64), (2, 130, 64), (4, 7, 2)])
def test_dense_chunking_equals_packed(batch, seqlen, chunk):
    dense = dense_chunking(batch, seqlen, chunk, torch.device("cpu"))
    packed = make_chunking(torch.arange(batch + 1, dtype=torch.int32) * seqlen, chunk)
    for field in ("cu_seqlens", "chunk_index", "chunk_offsets"):
        torch.testing.assert_close(getattr(dense, field), getattr(packed, field), rtol=0, atol=0)


def test_packed_chunking_with_empty_and_ragged_sequences():
    c = make_chunking(torch.tensor([0, 0, 5, 70, 70, 71]), 64)
    assert c.num_sequences == 5 and c.num_chunks == 4
    assert c.chunk_index.tolist() == [[1, 0], [2, 0], [2, 1], [4, 0]]
    assert c.chunk_offsets.tolist() == [0, 0, 1, 3, 3, 4]
