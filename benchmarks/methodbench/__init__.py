"""The pieces of `bench_methods.py`: measuring in fresh processes (`measure`), and tables and CSV (`report`)."""
