#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned dependencies plus dfml itself (editable).
# Re-running is cheap: installation is skipped while requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${DFML_VENV:-.venv}"
STAMP="$VENV/.dfml-installed"
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[bootstrap] installing pinned dependencies (first time: a few minutes, torch is large); log: $VENV/install.log"
    if ! "$VENV/bin/pip" install --disable-pip-version-check -r requirements.txt > "$VENV/install.log" 2>&1 \
        || ! "$VENV/bin/pip" install --disable-pip-version-check --no-deps -e . >> "$VENV/install.log" 2>&1; then
        grep -v "^WARNING: Location" "$VENV/install.log" | tail -30
        echo "[bootstrap] installation failed, see $VENV/install.log" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import torch, torchvision, snakemake, dvc, dfml" \
        || { echo "[bootstrap] the environment does not import torch/torchvision/snakemake/dvc/dfml" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
