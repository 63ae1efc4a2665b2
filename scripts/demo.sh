#!/usr/bin/env bash
# Demo until the analysis study lands: load an official-DeepViT checkpoint
# (deepvit_S layout at 32x32, from tests/fixtures), print its size and logits,
# and check them against the logits PyTorch produced.
set -euo pipefail
vitlab=${1:-build/bin/vitlab}
fx=tests/fixtures
out=runs/demo
mkdir -p "$out"
model=(--model deepvit_S --set model.img_size=32 --set model.patch_size=8 --set model.embed_dim=48
       --set model.depth=5 --set model.num_heads=4 --set model.num_classes=10 --set model.apply_transform=last:2)

echo "== vitlab info ${model[*]}"
"$vitlab" info "${model[@]}"
echo
echo "== vitlab forward (weights and input written by the official DeepViT code in PyTorch)"
"$vitlab" forward "${model[@]}" --weights "$fx/deepvit_official_S_style.safetensors" \
  --input "$fx/deepvit_official_S_style.input.pt" --output "$out/logits.pt" --attention "$out/attention.pt"
echo
echo "== against the logits and maps PyTorch produced"
"$vitlab" compare "$out/logits.pt" "$fx/deepvit_official_S_style.logits.pt" --atol 1e-4
"$vitlab" compare "$out/attention.pt" "$fx/deepvit_official_S_style.attn.pt" --atol 1e-5
