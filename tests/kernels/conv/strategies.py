"""Hypothesis strategies shared by the conv family's parity tests."""

from hypothesis import strategies as st


@st.composite
def batch_layout(draw, max_len: int, max_pieces: int, max_T: int):
    """(batch, T, lengths): a dense batch of 1-2 sequences of T tokens (lengths None), or up to
    ``max_pieces`` packed sequences (some maybe empty) summing to T >= 1 in a batch of one."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_pieces))
        T = max(sum(lengths), 1)
        lengths[-1] += T - sum(lengths)
        return 1, T, lengths
    return draw(st.integers(1, 2)), draw(st.integers(1, max_T)), None
