"""Needle-in-a-Haystack and RULER: synthetic retrieval over long haystacks."""
