"""`python tools/bench.py ...` == `megahybrid bench ...` (megahybrid/megatron/bench.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megahybrid.megatron.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
