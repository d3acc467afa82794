"""Results at any scale (issue #14): `python -m benchmarks results`.

Each part is a function that measures one thing and returns its figures; PARTS names them, and
`run()` (what `python -m benchmarks` calls) runs every part and gathers their figures under the
part's name. Add a part by writing its function here and listing it in PARTS.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from benchmarks._downloads import download_benchmark, memory_benchmark
from benchmarks._status_at_scale import status_at_scale

PARTS: list[Callable[[], dict[str, Any]]] = [status_at_scale, download_benchmark, memory_benchmark]


def run() -> dict[str, Any]:
    return {part.__name__: part() for part in PARTS}


def main() -> int:
    print(json.dumps(run(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
