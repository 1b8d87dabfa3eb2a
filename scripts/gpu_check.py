"""Every GPU figure in one command (see ``lacy_stream/bench/gpu_check.py``); runs from a checkout without installing.

    python scripts/gpu_check.py --out OUT [--budget-s 480] [--corpus docs.jsonl] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lacy_stream.bench.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
