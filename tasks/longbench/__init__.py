"""LongBench v1 and LongBench-E as THUDM runs them: data, the official metrics and a fixture generator."""
