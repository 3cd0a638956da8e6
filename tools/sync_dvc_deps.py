"""Rewrite dvc.yaml's dfml/ deps from what each stage's scripts import (dfml/codedeps.py).

    python tools/sync_dvc_deps.py           # rewrite dvc.yaml in place
    python tools/sync_dvc_deps.py --check   # exit 1 and show the difference when it is out of date
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from dfml.codedeps import REPO_ROOT, sync_dvc_deps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether dvc.yaml is up to date")
    args = parser.parse_args()
    path = REPO_ROOT / "dvc.yaml"
    current = path.read_text()
    wanted = sync_dvc_deps(current)
    if current == wanted:
        print("dvc.yaml: dfml deps up to date")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True), "dvc.yaml",
                                                   "dvc.yaml (derived)"))
        print("dvc.yaml is out of date: run python tools/sync_dvc_deps.py", file=sys.stderr)
        return 1
    path.write_text(wanted)
    print(f"dvc.yaml: dfml deps rewritten from the stages' scripts -> {Path(path).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
