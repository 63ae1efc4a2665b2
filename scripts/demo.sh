#!/usr/bin/env bash
# `make demo`: DeepViT's depth-scaling study in miniature on the built-in
# Fashion-MNIST (ViT vs DeepViT at 2, 4 and 8 blocks): train, evaluate,
# measure attention collapse, and write a report with its figures; then the
# positive control (ViT vs pure attention at initialisation, 3 seeds), which
# shows that the collapse measures do light up when collapse is there. A
# rerun skips what is done.
set -euo pipefail
vitlab=${1:-build/bin/vitlab}
out=${DEMO_OUT:-runs/demo}
control=${CONTROL_OUT:-runs/positive_control}
"$vitlab" study --config configs/depth_scaling_demo.yaml --out "$out"
"$vitlab" study --config configs/positive_control.yaml --out "$control"
echo
echo "report: $out/REPORT.md (figures beside it; per-member runs and analyses under $out/members/)"
echo "positive control: $control/REPORT.md (collapse measures against depth: measures_vs_depth.png)"
