"""Reference for the pos_embed resampling test: timm's resample_abs_pos_embed
(bicubic, antialias, class token kept apart) applied to the vit_timm_small
fixture's 4x4 grid, resized to 6x6 (img 48) and 2x2 (img 16).
Run with Debian's python3-torch: /usr/bin/python3 scripts/make_pos_embed_fixture.py"""
import torch
import torch.nn.functional as F

sd = torch.load("tests/fixtures/vit_timm_small.pt")
pe = sd["pos_embed"]  # [1, 1 + 16, 64]
for grid in (6, 2):
    prefix, g = pe[:, :1], pe[:, 1:]
    g = g.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    torch.save(torch.cat([prefix, g], dim=1), f"tests/fixtures/vit_timm_small.pos_embed_grid{grid}.pt")
