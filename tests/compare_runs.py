"""Compare regenerated result files with committed ones, byte for byte apart from provenance.

    python tests/compare_runs.py results/paper/runs <regenerated>/runs

Every file present in both folders must have equal JSON except the provenance keys of ``env``
(:data:`PROVENANCE`) and the installed environment (:data:`ENVIRONMENT`). Fields that only one side
has (config fields, env keys and metrics a newer membench added), and metrics the committed file
has as null but the new one fills (``peak_reserved_bytes``), are left out: what both have must be
equal. Prints one line per differing file and a summary; exit status 1 on any difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROVENANCE = ("created_at", "wall_time_s", "git_sha", "git_dirty", "membench_version", "identity_version", "trace")
ENVIRONMENT = ("transformers", "torch", "peft", "python", "platform")


def _shared(a, b):
    """Both dicts restricted to the keys both have (recursing into dict values), or the values as they are."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a, b
    keys = [k for k in a if k in b and not (a[k] is None and b[k] is not None)]
    pairs = {k: _shared(a[k], b[k]) for k in keys}
    return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def differences(committed: dict, regenerated: dict) -> list[str]:
    """What differs between two result documents, outside provenance and one-sided metrics."""
    out = []
    for key in sorted(set(committed) | set(regenerated)):
        a, b = committed.get(key), regenerated.get(key)
        if key == "env":
            a = {k: v for k, v in (a or {}).items() if k not in PROVENANCE + ENVIRONMENT}
            b = {k: v for k, v in (b or {}).items() if k not in PROVENANCE + ENVIRONMENT}
        a, b = _shared(a, b)
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else [key]
            out.append(f"{key}: {', '.join(keys)}")
    return out


def compare(committed_dir: Path, regenerated_dir: Path) -> tuple[int, list[str], list[str]]:
    """(files compared, lines for differing files, committed files missing from the regenerated folder)."""
    compared, lines, missing = 0, [], []
    for path in sorted(Path(committed_dir).glob("*.json")):
        other = Path(regenerated_dir) / path.name
        if not other.exists():
            missing.append(path.name)
            continue
        compared += 1
        found = differences(json.loads(path.read_text()), json.loads(other.read_text()))
        if found:
            lines.append(f"{path.name}: {'; '.join(found)}")
    return compared, lines, missing


if __name__ == "__main__":
    n, diff, missing = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print(*diff, sep="\n") if diff else None
    print(f"{n} compared, {len(diff)} differ, {len(missing)} not regenerated")
    sys.exit(1 if diff else 0)
