"""Print every package of requirements.lock with the version installed here; exit 1 on a mismatch.

`make env` runs it after installing, so a CI log shows the exact versions it tested with and
that they are the lock's. torch is compared by version only (`2.13.0+cu128` satisfies
`torch==2.13.0`), since the build (CPU or CUDA) is the machine's choice.

    python scripts/check_lock.py [requirements.lock]
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "requirements.lock")
    pins = read_lock(path)
    mismatches = []
    for name, want in sorted(pins.items(), key=lambda kv: kv[0].lower()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "(not installed)"
        ok = have.split("+", 1)[0] == want.split("+", 1)[0]
        print(f"  {name}=={have}" + ("" if ok else f"   <- the lock says {want}"))
        if not ok:
            mismatches.append(name)
    if mismatches:
        print(
            f"{len(mismatches)} of {len(pins)} packages differ from {path}: {', '.join(mismatches)}"
        )
        return 1
    print(f"all {len(pins)} packages equal {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
