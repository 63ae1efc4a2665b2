#!/usr/bin/env bash
# `make demo`: DeepViT's depth-scaling study in miniature on the built-in
# Fashion-MNIST (ViT vs DeepViT at 2, 4 and 8 blocks): train, evaluate,
# measure attention collapse, and write a report with its figures. A rerun
# skips what is done.
set -euo pipefail
vitlab=${1:-build/bin/vitlab}
out=${DEMO_OUT:-runs/demo}
"$vitlab" study --config configs/depth_scaling_demo.yaml --out "$out"
echo
echo "report: $out/REPORT.md (figures beside it; per-member runs and analyses under $out/members/)"
