#!/usr/bin/env bash
# Realign Snakemake with DVC after `dvc checkout`, `dvc pull`, `dvc exp apply`, or `git checkout` +
# `dvc checkout` (docs/versioning.md). Nothing is recomputed.
#
# DVC restores artifacts by content: they get fresh mtimes in arbitrary order, and .snakemake/ holds
# the params and code of the last Snakemake run here (or nothing at all, in a fresh clone). Plain
# `snakemake` would then rerun jobs whose outputs are current, or, without recorded params, miss a later
# params change. Once `dvc status` confirms that the workspace matches dvc.lock (artifacts, params.yaml
# and code), `snakemake --touch --forceall` marks every output of the target current: it touches the
# outputs in DAG order and records the present params and code as their provenance.
#
# Usage: tools/dvc_touch.sh [snakemake targets or options]   (default target: all)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dvc status --quiet; then
    dvc status
    echo "dvc_touch: the workspace does not match dvc.lock; run 'dvc checkout' (or 'dvc repro') first" >&2
    exit 1
fi
exec snakemake --cores 1 --touch --forceall "$@"
