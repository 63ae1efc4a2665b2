#!/usr/bin/env bash
# Regenerates the test fixtures that need no network (timm: the ViT, LayerScale ViT and CaiT ones; pos_embed,
# transformer, pickle; the DeepViT ones too when DVIT_REPO names a zhoudaquan/dvit_repo checkout) into a temporary
# folder with scripts/make_fixtures.py and compares them with tests/fixtures: same keys, shapes and dtypes, values
# within manifest.json's tolerances. Prints one line per file; exits 1 naming each file that differs and by how much.
#   scripts/check-fixtures.sh                      # PYTHON=... overrides .venv-bench/bin/python
#   DVIT_REPO=/path/to/dvit_repo scripts/check-fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-bench/bin/python}
command -v "$PYTHON" >/dev/null || {
  echo "check-fixtures: no $PYTHON (make it with scripts/install-deps.sh --bench, or set PYTHON=)" >&2
  exit 2
}
only=timm,pos_embed,transformer,pickle dvit=()
if [ -n "${DVIT_REPO:-}" ]; then
  only+=,deepvit dvit=(--dvit-repo "$DVIT_REPO")
else
  echo "check-fixtures: DVIT_REPO not set, the DeepViT fixtures are not checked"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" scripts/make_fixtures.py --only "$only" "${dvit[@]}" --out "$tmp/fixtures" --compare tests/fixtures
