"""Running methods on tasks: the runner, run records, sharding and the lm-eval adapter."""
