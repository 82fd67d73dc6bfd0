"""The harness: CLI, model loading, evaluation, training, sweeps and reporting."""
