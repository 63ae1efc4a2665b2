#!/usr/bin/env bash
# Prints the CMAKE_PREFIX_PATH for the LibTorch inside the torch wheel of a
# virtual environment (default .venv): the wheel's CMake package folder and
# its root, whose lib/ CMake then searches before a system LibTorch's (the
# wheel's TorchConfig.cmake finds its libraries by name, not by path).
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || { echo "torch-prefix: no virtual environment at $venv (scripts/install-deps.sh makes it)" >&2; exit 1; }
# find_spec locates the package without importing it (an import takes seconds).
"$venv/bin/python" -c '
import importlib.util, sys
spec = importlib.util.find_spec("torch")
if spec is None:
    sys.exit("torch-prefix: torch is not installed in " + sys.prefix)
root = spec.submodule_search_locations[0]
print(root + "/share/cmake;" + root)'
