"""Benchmarks: `python scripts/bench.py {export,runtime,quant} [args]` prints one JSON object.

Each benchmark lives in scripts/bench_<name>.py with a `main(argv) -> dict`; ratios are measured side
by side in one run. Targets are reported next to the figures, never asserted in tests.
"""

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
NAMES = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: python scripts/bench.py {{{','.join(NAMES)}}} [args]")
    name = sys.argv[1]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(sys.argv[2:])
    print(json.dumps({"benchmark": name, **result}, indent=2))


if __name__ == "__main__":
    main()
