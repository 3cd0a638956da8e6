"""Rewrite dvc.yaml's code params and workflow/code_digests.yaml from what each stage runs (dfml/codedeps.py).

Each stage of dvc.yaml lists, as params of workflow/code_digests.yaml, its scripts and the dfml modules they
import; that file holds each one's code digest, blind to comments, docstrings and layout. Run this after
editing code and before `dvc status` or `dvc repro` (any Snakemake run refreshes the digests as well), so
that DVC reruns the stages whose code changed and no other:

    python tools/sync_dvc_deps.py           # rewrite dvc.yaml and workflow/code_digests.yaml in place
    python tools/sync_dvc_deps.py --check   # exit 1 and show the difference when either is out of date
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from dfml.codedeps import DIGESTS_FILE, REPO_ROOT, digests_text, dvc_code_keys, sync_dvc_deps


def wanted_files(root: Path) -> dict[Path, str]:
    """{path: the text it should have}: dvc.yaml, then the digests of every key its stages list."""
    dvc_yaml = sync_dvc_deps((root / "dvc.yaml").read_text(), root)
    return {root / "dvc.yaml": dvc_yaml, root / DIGESTS_FILE: digests_text(dvc_code_keys(dvc_yaml), root)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = parser.parse_args(argv)
    stale = 0
    for path, wanted in wanted_files(REPO_ROOT).items():
        current = path.read_text() if path.is_file() else ""
        name = str(path.relative_to(REPO_ROOT))
        if current == wanted:
            print(f"{name}: up to date")
        elif args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True), name,
                                                       f"{name} (derived)"))
        else:
            path.write_text(wanted)
            print(f"{name}: rewritten from the stages' code")
    if stale:
        print("out of date: run python tools/sync_dvc_deps.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
