"""InfiniteBench (Zhang et al., 2024, arXiv 2402.13718): its synthetic retrieval tasks generated offline and its
released tasks read from files or the hub."""
