"""`python -m unimem_bench.harness.cli` (what torchrun and accelerate launch)."""

import sys

from unimem_bench.harness.cli.app import main

sys.exit(main())
