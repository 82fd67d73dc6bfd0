"""BABILong (Kuratov et al., 2024): its qa1-qa5 from the official data, and BABILong-style samples generated from
your own books."""
