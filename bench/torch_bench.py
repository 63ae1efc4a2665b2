#!/usr/bin/env python3
"""The PyTorch side of `make bench`: the same measurement as `vitlab bench`
for timm's VisionTransformer built from vitlab's resolved config (same depth,
width, heads, patch, image size, pooling, batch, threads and steps), for
DeepViT written as its official code is (a config with `apply_transform`),
and for torchvision's ImageFolder + PIL transforms + DataLoader. `--compile`
runs the model under torch.compile (inductor). Its last line is one JSON
object, as vitlab's.

  torch_bench.py model --config '{"img_size": 224, ...}' --mode train --batch 32 --steps 20 --warmup 5 --threads 2
  torch_bench.py loader --data ROOT --batch 32 --steps 20 --workers 1 --img-size 224
"""
import argparse
import json
import resource
import statistics
import sys
import time

import timm
import torch
import torchvision
from torch import nn
from torchvision import transforms


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ReAttention(nn.Module):
    """zhoudaquan/dvit_repo's ReAttention (models/layers.py), as PyTorch users run it."""

    def __init__(self, dim, num_heads, qkv_bias, apply_transform, reatten_scale):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.apply_transform, self.reatten_scale = apply_transform, reatten_scale
        if apply_transform:
            self.reatten_matrix = nn.Conv2d(num_heads, num_heads, 1, 1)
            self.var_norm = nn.BatchNorm2d(num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.apply_transform:
            attn = self.var_norm(self.reatten_matrix(attn)) * self.reatten_scale
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DeepViTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, apply_transform, reatten_scale):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ReAttention(dim, num_heads, qkv_bias, apply_transform, reatten_scale)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeepViT(nn.Module):
    """The official DeepVisionTransformer's layout: conv patch embedding, class token, blocks, norm, head."""

    def __init__(self, c):
        super().__init__()
        dim, grid = c["embed_dim"], c["img_size"] // c["patch_size"]
        scale = (dim // c["num_heads"]) ** -0.5 if c["transform_scale"] else 1.0
        self.patch_embed = nn.Conv2d(c["in_chans"], dim, c["patch_size"], c["patch_size"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(
            DeepViTBlock(dim, c["num_heads"], c["mlp_ratio"], c["qkv_bias"], t, scale) for t in c["apply_transform"])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c["num_classes"])

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def make_model(c):
    if any(c.get("apply_transform", [])):
        return DeepViT(c)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["in_chans"], num_classes=c["num_classes"],
        embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
        qkv_bias=c["qkv_bias"], class_token=c["class_token"], global_pool=c["global_pool"])


def bench_model(args):
    c = json.loads(args.config)
    torch.manual_seed(0)
    model = make_model(c)
    train = args.mode == "train"
    model.train(train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch, c["in_chans"], c["img_size"], c["img_size"])
    y = torch.randint(c["num_classes"], (args.batch,))

    def step():
        if train:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():  # as timm's benchmark.py
                model(x)

    for _ in range(args.warmup):
        step()
    ms = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        s = time.perf_counter()
        step()
        ms.append(1000.0 * (time.perf_counter() - s))
    total = time.perf_counter() - t0
    return {"side": "pytorch", "mode": args.mode, "batch": args.batch, "steps": args.steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "compile": args.compile,
            "images_per_sec": args.batch * args.steps / total, "step_ms_median": statistics.median(ms),
            "step_ms_min": min(ms), "peak_rss_mb": peak_rss_mb()}


def bench_loader(args):
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    data = torchvision.datasets.ImageFolder(args.data + "/train", transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         drop_last=True)
    it = iter(loader)
    next(it)  # warm-up: workers started, first images decoded
    images = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        images += next(it)[0].shape[0]
    total = time.perf_counter() - t0
    return {"side": "pytorch", "batch": args.batch, "steps": args.steps, "workers": args.workers,
            "images_per_sec": images / total, "images_per_sec_per_worker": images / total / args.workers,
            "peak_rss_mb": peak_rss_mb(), "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("--config", required=True, help="vitlab's resolved model config (vitlab info) as JSON")
    m.add_argument("--mode", choices=["infer", "train"], default="infer")
    m.add_argument("--compile", action="store_true", help="torch.compile (inductor) the model")
    l = sub.add_parser("loader")
    l.add_argument("--data", required=True, help="ImageFolder root with a train/ split")
    l.add_argument("--workers", type=int, default=1)
    l.add_argument("--img-size", type=int, default=224)
    for q in (m, l):
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--steps", type=int, default=20)
        q.add_argument("--warmup", type=int, default=5)
        q.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = bench_model(args) if args.what == "model" else bench_loader(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
