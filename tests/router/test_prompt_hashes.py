"""A prompt's block hashes extended from those of its start are the hashes of its ids computed whole."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.hashing import extend_hash_list, hash_list


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=300),
    block_size=st.integers(1, 70),
    data=st.data(),
)
def test_extending_the_hashes_of_a_start_gives_those_of_the_whole(tokens, block_size, data):
    """The hashes of any number of leading whole blocks, extended over all the tokens, are hash_list of them all."""
    whole = hash_list(tokens, block_size)
    known = data.draw(st.integers(0, len(whole)))
    for form in (tokens, np.asarray(tokens, dtype=np.int64)):
        assert extend_hash_list(whole[:known], form, block_size) == whole
