"""Regenerates tests/fixtures, the reference test vectors the C++ tests compare against, by running the public
reference implementations:

- vit_timm_small.*: timm's VisionTransformer (timm 1.0.31 from PyPI), random seeded weights perturbed so every
  tensor matters; attention maps captured after the softmax (timm's fused attention switched off for that).
  vit_timm_small.legacy.pt holds its state_dict in torch.save's legacy format (_use_new_zipfile_serialization=False).
- vit_timm_small.pos_embed_grid{6,2}.pt: timm's resample_abs_pos_embed (bicubic, antialiased, class token kept
  apart) of that fixture's 4x4 position embedding, resized to 6x6 (img 48) and 2x2 (img 16).
- deepvit_official_small.*, deepvit_official_S_style.*: the official DeepViT code (github.com/zhoudaquan/dvit_repo,
  models/), BatchNorm statistics warmed on random data, eval mode. Needs --dvit-repo (a checkout of that
  repository); without it these are skipped, and the random draws their construction makes are replayed so that
  the fixtures made after them come out the same.
- transformer_torch_small.*: torch.nn.Transformer (post-LN encoder-decoder) with a causal target mask.
- vit_timm_layerscale.*: timm's VisionTransformer(init_values=1e-5), LayerScale gammas perturbed like every weight.
- cait_timm_small.*: timm's Cait (timm/models/cait.py) reduced to 3 talking-heads self-attention blocks over the
  patch tokens and 2 class-attention blocks; .attn.pt holds the self-attention maps after proj_w [L,B,H,N,N],
  .class_attn.pt the class-attention maps [2,B,H,1,N+1].
- pickle/: small torch.save files for tests/test_pickle.cpp, each tensor file with a .safetensors twin; *.legacy.*
  the same objects in torch.save's legacy format.

Each model fixture is <name>.pt (state_dict, torch.save), <name>.safetensors (the same tensors), its input(s), its
output, and for the vision models the attention maps [L,B,H,T,T] and the DeepViT cross-layer similarity
[L,L,H,T]; manifest.json gives each one's configuration, parameter count, tolerances and what every file holds.
The first model fixtures come from one random stream (torch.manual_seed(1234), drawn in the order timm, DeepViT small,
DeepViT S-style, nn.Transformer), the LayerScale ViT and CaiT from a second (seed 2026, in that order), the pickle
files from their own (seed 0).

The committed tests/fixtures were made this way on Debian's python3-torch 1.13.1 with a timm snapshot and
dvit_repo at 1ccb152 (by an earlier generator; the pos_embed and pickle files by two small scripts, now folded in
here). This script runs in the bench environment (torch 2.15.0, timm 1.0.31, safetensors 0.8.0, made by
`scripts/install-deps.sh --bench`), which draws the same random numbers: its model fixtures agree with the
committed ones within the tolerances (last-bit differences from trunc_normal_'s erfinv and the forward passes).
pickle/checkpoint.* were made by this script on torch 2.15.0 (whose Adam has more param_group keys than 1.13's).
vit_timm_layerscale.* and cait_timm_small.* were made on python3-torch 1.13.1 with a timm snapshot by the shared
fixture generator (its sections 5 and 6, ported here as they were); this script's agree with them within the
tolerances in the same way.

    .venv-bench/bin/python scripts/make_fixtures.py --dvit-repo /path/to/dvit_repo --out tests/fixtures
    .venv-bench/bin/python scripts/make_fixtures.py --out runs/fixtures-new --compare tests/fixtures

--only picks groups (timm: vit_timm_small, vit_timm_layerscale, cait_timm_small; transformer, deepvit, pos_embed,
pickle); the others are still built where the random stream needs them, but not written. Files are written to a
temporary folder beside --out, then moved into it; manifest.json keeps the entries of fixtures not regenerated.
--compare REF compares every file written with the one in REF (keys, shapes, dtypes, values within the manifest's
tolerances) and exits 1 when any differ; scripts/check-fixtures.sh runs it for CI.
"""
import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from functools import partial

import safetensors.torch
import torch

SEED = 1234  # the model fixtures' random stream
LAYERSCALE_SEED = 2026  # vit_timm_layerscale then cait_timm_small: a stream of their own, as the shared generator had
PICKLE_SEED = 0
GROUPS = ("timm", "pos_embed", "deepvit", "transformer", "pickle")
VISION_TOLERANCE = {"logits_max_abs": 1e-4, "attn_max_abs": 1e-5, "similarity_max_abs": 1e-5}

# Tolerances for --compare where manifest.json names none. Weights and inputs are random draws that should agree to
# the last bit or two (trunc_normal_ goes through erfinv); BatchNorm running statistics and Adam's buffers come out of
# a forward pass. pos_embed: the tolerance tests/test_models.cpp checks it to.
WEIGHTS_MAX_ABS = 1e-6
WEIGHTS_MAX_REL = 1e-5  # of the largest magnitude in the tensor (running_var can be ~10)
POS_EMBED_MAX_ABS = 1e-5

FILES_DOC = {
    "<name>.attn.pt": "attention maps [L,B,H,T,T]: per block, the map that multiplies V",
    "<name>.input.pt": "input tensor [B,C,H,W] (float32)",
    "<name>.legacy.pt": "the state_dict of <name>.pt in torch.save's legacy format (_use_new_zipfile_serialization="
                        "False); vit_timm_small only",
    "<name>.logits.pt": "model(input) in eval mode",
    "<name>.pt": "state_dict as a plain dict, written by Python torch.save (zip format)",
    "<name>.safetensors": "the same tensors in the safetensors format",
    "<name>.similarity.pt": "DeepViT cross-layer similarity M [L,L,H,T] (p, q, head, token), mean over the batch",
    "cait_timm_small.class_attn.pt": "CaiT class-attention maps [2,B,H,1,N+1] (class token first among keys)",
    "transformer_torch_small.{src,tgt,output}.pt": "nn.Transformer inputs [S,B,E], [T,B,E] and output [T,B,E]",
}


class Sink:
    """Writes the selected groups' files into a staging folder and collects their manifest entries."""

    def __init__(self, staging, groups):
        self.staging, self.groups = staging, set(groups)
        self.files = []  # (group, path relative to the output folder)
        self.manifest = {}

    def wants(self, group):
        return group in self.groups

    def _path(self, group, rel):
        self.files.append((group, rel))
        path = os.path.join(self.staging, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save(self, group, rel, obj, **kwargs):
        if self.wants(group):
            torch.save(obj, self._path(group, rel), **kwargs)

    def save_safetensors(self, group, rel, tensors):
        if self.wants(group):  # contiguous copies: safetensors refuses views and tensors sharing memory
            safetensors.torch.save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
                                        self._path(group, rel))

    def entry(self, group, name, entry):
        if self.wants(group):
            self.manifest[name] = entry


# ---------------------------------------------------------------------------------------------- shared helpers

def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


def state_dict_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb_parameters(model, scale=0.02):
    """Adds noise from the global stream to every parameter (timm inits cls_token to ~1e-6, LayerNorm to 1/0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def reference_similarity(maps):
    """maps [L,B,H,T,T] -> M [L,L,H,T], averaged over images: M^{p,q}_{h,t} = cos(A^p_{h,:,t}, A^q_{h,:,t}), the
    cosine between layers p and q of column t (token t's contribution to every output token), in float64."""
    cols = maps.double().transpose(-1, -2)  # [L,B,H,T(t),T(i)]: row t holds column t
    cols = cols / cols.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("pbhti,qbhti->pqbht", cols, cols).mean(dim=2)


def save_vision_fixture(sink, group, name, model, x, maps, config, note):
    """<name>.pt, .safetensors, .input.pt, .logits.pt, .attn.pt, .similarity.pt and the manifest entry; `maps` is
    the list the model's attention hooks append to during model(x)."""
    sd = state_dict_copy(model)
    sink.save(group, name + ".pt", sd)
    sink.save_safetensors(group, name + ".safetensors", sd)
    sink.save(group, name + ".input.pt", x)
    maps.clear()
    with torch.no_grad():
        y = model(x)
    sink.save(group, name + ".logits.pt", y)
    if len(maps) != config["depth"]:
        raise RuntimeError(f"{name}: captured {len(maps)} attention maps for {config['depth']} blocks "
                           "(is timm's fused attention still on?)")
    attn = torch.stack(maps)  # [L,B,H,T,T]
    sink.save(group, name + ".attn.pt", attn)
    sink.save(group, name + ".similarity.pt", reference_similarity(attn).float())
    sink.entry(group, name, {"config": config, "note": note, "input_shape": list(x.shape),
                             "output_shape": list(y.shape), "parameters": num_parameters(model),
                             "tolerance": dict(VISION_TOLERANCE)})


# ---------------------------------------------------------------------------------------------- timm

def vit_timm_small(sink):
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=3, num_heads=4,
               mlp_ratio=4.0, qkv_bias=True)
    model = VisionTransformer(**cfg).eval()
    perturb_parameters(model)
    maps = []
    for blk in model.blocks:  # attn_drop (identity in eval) receives the post-softmax map
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    save_vision_fixture(sink, "timm", "vit_timm_small", model, x, maps,
                        dict(cfg, layer_norm_eps=1e-6, class_token=True, global_pool="token"),
                        "timm VisionTransformer; state_dict key names are timm's; attn = post-softmax maps per block")
    sink.save("timm", "vit_timm_small.legacy.pt", state_dict_copy(model), _use_new_zipfile_serialization=False)
    return model


def pos_embed_grids(sink, vit):
    from timm.layers import resample_abs_pos_embed

    pos_embed = vit.pos_embed.detach().clone()  # [1, 1 + 4*4, 64]
    for grid in (6, 2):
        resized = resample_abs_pos_embed(pos_embed, new_size=[grid, grid], old_size=[4, 4], num_prefix_tokens=1,
                                         interpolation="bicubic", antialias=True)
        sink.save("pos_embed", f"vit_timm_small.pos_embed_grid{grid}.pt", resized.contiguous())


def vit_timm_layerscale(sink):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(LAYERSCALE_SEED)
    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=3, num_heads=4,
               mlp_ratio=4.0, qkv_bias=True, init_values=1e-5)
    model = VisionTransformer(**cfg).eval()
    perturb_parameters(model)  # moves the gammas off init_values too
    maps = []
    for blk in model.blocks:
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    save_vision_fixture(sink, "timm", "vit_timm_layerscale", model, x, maps,
                        dict(cfg, layer_norm_eps=1e-6, class_token=True, global_pool="token"),
                        "timm VisionTransformer(init_values=1e-5): LayerScale as blocks.N.ls1.gamma / ls2.gamma; "
                        "attn = post-softmax maps")


def cait_timm_small(sink):
    """Draws on from where vit_timm_layerscale left the stream."""
    from timm.models.cait import Cait

    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=3, num_heads=4,
               mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, depth_token_only=2, mlp_ratio_token_only=4.0)
    model = Cait(**cfg).eval()
    perturb_parameters(model)
    maps, class_maps = [], []
    for blk in model.blocks:  # TalkingHeadAttn's attn_drop receives the map after proj_w, the one that multiplies V
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach().clone()))
    for blk in model.blocks_token_only:  # ClassAttn's: the softmax map of the class token's query
        blk.attn.attn_drop.register_forward_hook(lambda m, i, o: class_maps.append(o.detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    save_vision_fixture(sink, "timm", "cait_timm_small", model, x, maps, dict(cfg, layer_norm_eps=1e-6),
                        "timm Cait: attn = self-attention blocks' maps after talking heads (proj_w), the maps that "
                        "multiply V, over patch tokens only [L,B,H,N,N]; class_attn = class-attention blocks' "
                        "softmax maps [2,B,H,1,N+1]")
    if len(class_maps) != cfg["depth_token_only"]:  # save_vision_fixture ran the only forward pass
        raise RuntimeError(f"cait_timm_small: captured {len(class_maps)} class-attention maps for "
                           f"{cfg['depth_token_only']} blocks")
    sink.save("timm", "cait_timm_small.class_attn.pt", torch.stack(class_maps))


# ---------------------------------------------------------------------------------------------- DeepViT

DEEPVIT_SMALL = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=4, num_heads=4,
                     mlp_ratio=3, qkv_bias=True, apply_transform=[True] * 4, transform_scale=False,
                     scale_adjustment=1.0, use_cnn_embed=False)
DEEPVIT_S_STYLE = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=5, num_heads=4,
                       mlp_ratio=3, qkv_bias=True, apply_transform=[False] * 3 + [True] * 2, transform_scale=True,
                       scale_adjustment=0.5, use_cnn_embed=True)
DEEPVIT_NOTES = {
    "deepvit_official_small": "official DeepViT (zhoudaquan/dvit_repo) DeepVisionTransformer in eval mode, BatchNorm "
    "running stats warmed; attn = the map that multiplies V (after Theta + BatchNorm where apply_transform)",
    "deepvit_official_S_style": "official DeepViT like deepvit_S: PatchEmbed_CNN stem (conv7x7/2+BN+ReLU, "
    "conv3x3+BN+ReLU, conv patch/2), re-attention in the last 2 of 5 blocks, transform_scale=True, "
    "scale_adjustment=0.5",
}
# (name, configuration, seed of warm_batchnorm's own generator), in the order they draw from the stream
DEEPVIT_FIXTURES = (("deepvit_official_small", DEEPVIT_SMALL, 0), ("deepvit_official_S_style", DEEPVIT_S_STYLE, 1))


def load_dvit(repo):
    """models/deep_vision_transformer.py of a dvit_repo checkout, imported as the package it is written as."""
    models = os.path.join(os.path.abspath(repo), "models")
    if not os.path.isfile(os.path.join(models, "deep_vision_transformer.py")):
        sys.exit(f"make_fixtures: {repo} has no models/deep_vision_transformer.py (expected a zhoudaquan/dvit_repo "
                 "checkout)")
    spec = importlib.util.spec_from_file_location("dvit_models", os.path.join(models, "__init__.py"),
                                                  submodule_search_locations=[models])
    package = importlib.util.module_from_spec(spec)
    sys.modules["dvit_models"] = package
    with warnings.catch_warnings():  # it imports timm.models.layers/helpers/registry, deprecated aliases
        warnings.simplefilter("ignore", FutureWarning)
        spec.loader.exec_module(package)
    return importlib.import_module("dvit_models.deep_vision_transformer")


def warm_batchnorm(model, shape, seed, steps=3):
    """Non-trivial BatchNorm running statistics from a few training-mode passes on random data, then eval mode;
    BatchNorm and LayerNorm affine parameters perturbed. Draws only from its own generator."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=g) * 2 + 0.3)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))


def deepvit_fixture(sink, dvit, name, cfg, warm_seed):
    model = dvit.DeepVisionTransformer(**dict(cfg, depth=[False] * cfg["depth"]),  # a list: one entry per block
                                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    warm_batchnorm(model, (8, 3, 32, 32), seed=warm_seed)
    maps = []
    for blk in model.blocks:  # the attention returns (x, the map that multiplies V)
        blk.attn.register_forward_hook(lambda m, i, o: maps.append(o[1].detach().clone()))
    x = torch.randn(2, 3, 32, 32)
    save_vision_fixture(sink, "deepvit", name, model, x, maps, dict(cfg, layer_norm_eps=1e-6), DEEPVIT_NOTES[name])


def replay_deepvit_draws(cfg):
    """Draws from the global stream what deepvit_fixture(cfg) draws, without the DeepViT code: its modules'
    default initialisation in construction order, trunc_normal_ of pos_embed, cls_token and every Linear weight
    (DeepVisionTransformer._init_weights, in Module.apply order), then the input. Checked against the real code
    whenever --dvit-repo is given."""
    from timm.layers import trunc_normal_

    nn, e, h = torch.nn, cfg["embed_dim"], cfg["num_heads"]
    if cfg["use_cnn_embed"]:
        nn.Conv2d(cfg["in_chans"], 64, 7, 2, 3, bias=False)
        nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        nn.Conv2d(64, e, cfg["patch_size"] // 2, cfg["patch_size"] // 2)
    else:
        nn.Conv2d(cfg["in_chans"], e, cfg["patch_size"], cfg["patch_size"])
    linears = []
    for transform in cfg["apply_transform"]:
        if transform:
            nn.Conv2d(h, h, 1, 1)  # the re-attention matrix Theta
        linears += [nn.Linear(e, e * 3), nn.Linear(e, e),  # qkv (expansion 3), proj
                    nn.Linear(e, int(e * cfg["mlp_ratio"])), nn.Linear(int(e * cfg["mlp_ratio"]), e)]
    linears.append(nn.Linear(e, cfg["num_classes"]))
    tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
    trunc_normal_(torch.zeros(1, tokens, e), std=.02)
    trunc_normal_(torch.zeros(1, 1, e), std=.02)
    for linear in linears:
        trunc_normal_(linear.weight, std=.02)
    torch.randn(2, 3, 32, 32)


def deepvit_fixtures(sink, dvit):
    for name, cfg, warm_seed in DEEPVIT_FIXTURES:
        if dvit is None:
            replay_deepvit_draws(cfg)
            continue
        before = torch.get_rng_state()
        deepvit_fixture(sink, dvit, name, cfg, warm_seed)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        replay_deepvit_draws(cfg)
        if not torch.equal(torch.get_rng_state(), after):
            raise RuntimeError(f"{name}: replay_deepvit_draws no longer draws what the DeepViT code draws; fix it")
        torch.set_rng_state(after)


# ---------------------------------------------------------------------------------------------- nn.Transformer

def transformer_torch_small(sink):
    cfg = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
               activation="relu", layer_norm_eps=1e-5, batch_first=False, norm_first=False)
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... batch_first was not True"
        warnings.simplefilter("ignore", UserWarning)
        model = torch.nn.Transformer(**cfg).eval()
    src, tgt = torch.randn(6, 2, 32), torch.randn(5, 2, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)  # float, -inf above the diagonal
    with torch.no_grad():
        y = model(src, tgt, tgt_mask=mask)
    sd = state_dict_copy(model)
    sink.save("transformer", "transformer_torch_small.pt", sd)
    sink.save_safetensors("transformer", "transformer_torch_small.safetensors", sd)
    sink.save("transformer", "transformer_torch_small.src.pt", src)
    sink.save("transformer", "transformer_torch_small.tgt.pt", tgt)
    sink.save("transformer", "transformer_torch_small.output.pt", y)
    sink.entry("transformer", "transformer_torch_small", {
        "config": cfg, "note": "torch.nn.Transformer (encoder-decoder stack only, no embeddings); output = "
        "model(src, tgt, tgt_mask=causal) with src [S,B,E], tgt [T,B,E]; the causal mask is float with -inf above "
        "the diagonal", "parameters": num_parameters(model), "tolerance": {"output_max_abs": 1e-4}})


# ---------------------------------------------------------------------------------------------- pickle

def pickle_fixtures(sink):
    """Files written by torch.save for tests/test_pickle.cpp, each tensor file with a .safetensors twin holding the
    same tensors (contiguous copies). Values that are not tensors are literals the test spells out."""
    g = "pickle"
    torch.manual_seed(PICKLE_SEED)

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 2 * 2, 2))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 2, 2, 2))  # running statistics and num_batches_tracked move off their defaults
    sd = model.state_dict()  # an OrderedDict with _metadata; saved now, before the optimizer step changes it
    sink.save(g, "pickle/state_dict.pt", sd)
    sink.save_safetensors(g, "pickle/state_dict.safetensors", sd)

    # Adam keeps a 0-d float `step` tensor and two buffers per parameter, keyed by parameter index.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 2, 2, 2)).sum().backward()
    # The conv bias feeds BatchNorm: its true gradient is 0, and Adam's first
    # step would turn the rounding noise left in it into an update of +-lr.
    model[0].bias.grad.zero_()
    optimizer.step()
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "args": argparse.Namespace(lr=0.1)}
    sink.save(g, "pickle/checkpoint.pth", ckpt)
    sink.save(g, "pickle/checkpoint.legacy.pth", ckpt, _use_new_zipfile_serialization=False)
    twin = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for index, state in ckpt["optimizer"]["state"].items():
        twin.update({f"optimizer.{index}.{k}": v for k, v in state.items()})
    sink.save_safetensors(g, "pickle/checkpoint.safetensors", twin)

    # Views of one storage: the .pt file holds it once.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"base": base, "slice": base[1:3, ::2], "transposed": base.t(), "row": base[2], "element": base[3, 5]}
    sink.save(g, "pickle/views.pt", views)
    sink.save(g, "pickle/views.legacy.pt", views, _use_new_zipfile_serialization=False)
    sink.save_safetensors(g, "pickle/views.safetensors", views)

    dtypes = {
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(3, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), -1, 0, 2**62]),
        "i32": torch.tensor([-7, 8], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    sink.save(g, "pickle/dtypes.pt", dtypes)
    sink.save(g, "pickle/dtypes.legacy.pt", dtypes, _use_new_zipfile_serialization=False)
    sink.save_safetensors(g, "pickle/dtypes.safetensors", dtypes)

    parameter = torch.nn.Parameter(torch.randn(3, 2))
    sink.save(g, "pickle/parameter.pt", parameter)
    tensor = torch.randn(2, 3)
    sink.save(g, "pickle/tensor.pt", tensor)
    sink.save_safetensors(g, "pickle/tensors.safetensors", {"parameter": parameter, "tensor": tensor})

    # Plain Python values, through the opcodes of protocol 2 (torch.save's default) and 4.
    values = {
        "none": None, "true": True, "false": False,
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31, 2**40, -(2**63), 2**63 - 1],
        "float": -1.5e-3, "str": "h\u00e9llo", "empty": "",
        "tuple": (1, "a", (2.0,)), "nested": {"list": [[], {}], 7: "int key"},
        "set": {3}, "frozenset": frozenset({4}), "bytes": b"\x00\xff", "dtype": torch.float16,
        "shared": [[1, 2]] * 2,
    }
    for protocol in (2, 4):
        sink.save(g, f"pickle/values_p{protocol}.pt", values, pickle_protocol=protocol)
    # The legacy format in protocol 4, whose pickles start with a FRAME.
    sink.save(g, "pickle/tensor.legacy_p4.pt", tensor, _use_new_zipfile_serialization=False, pickle_protocol=4)


# ---------------------------------------------------------------------------------------------- generation

def generate(out, groups, dvit_repo):
    import timm
    import timm.layers

    timm.layers.set_fused_attn(False)  # before any model is built: Attention reads it in __init__
    dvit = load_dvit(dvit_repo) if dvit_repo else None
    if dvit is None and "deepvit" in groups:
        print("make_fixtures: deepvit skipped (no --dvit-repo); its random draws are replayed for the fixtures "
              "after it")
        groups = [g for g in groups if g != "deepvit"]
    print(f"make_fixtures: torch {torch.__version__}, timm {timm.__version__}, safetensors "
          f"{safetensors.__version__}; writing {', '.join(groups)} to {out}")

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".make_fixtures-", dir=os.path.dirname(out))
    try:
        sink = Sink(staging, groups)
        torch.manual_seed(SEED)  # one stream, drawn in this order
        vit = vit_timm_small(sink)
        pos_embed_grids(sink, vit)
        deepvit_fixtures(sink, dvit)
        transformer_torch_small(sink)
        vit_timm_layerscale(sink)  # reseeds
        cait_timm_small(sink)
        pickle_fixtures(sink)

        manifest_path = os.path.join(out, "manifest.json")
        manifest = {}
        if os.path.exists(manifest_path):  # keep the entries of fixtures not made this time
            with open(manifest_path) as f:
                manifest = json.load(f)
        manifest.update(sink.manifest)
        manifest["_files"] = FILES_DOC
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")  # as the committed manifest.json ends
        for _, rel in sink.files + [(None, "manifest.json")]:
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            os.replace(os.path.join(staging, rel), os.path.join(out, rel))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    params = {k: v["parameters"] for k, v in sink.manifest.items()}
    print(f"make_fixtures: {len(sink.files)} files and manifest.json; parameters {json.dumps(params)}")
    return sink.files, sink.manifest


# ---------------------------------------------------------------------------------------------- comparison

def tolerance_for(rel, ref_manifest):
    """(max abs, max relative to the reference's largest magnitude) allowed for one file's floating values."""
    base = os.path.basename(rel)
    if rel.startswith("pickle/"):
        return WEIGHTS_MAX_ABS, WEIGHTS_MAX_REL
    if ".pos_embed_grid" in base:
        return POS_EMBED_MAX_ABS, 0.0
    name, _, kind = base.partition(".")
    kind = kind.rsplit(".", 1)[0]  # "logits" from "logits.pt", "" from ".pt"/".safetensors"
    tol = ref_manifest.get(name, {}).get("tolerance", {})
    if kind == "class_attn" and "class_attn_max_abs" not in tol:
        kind = "attn"  # CaiT's class-attention maps: softmax outputs like the others
    if f"{kind}_max_abs" in tol:
        return tol[f"{kind}_max_abs"], 0.0
    return WEIGHTS_MAX_ABS, WEIGHTS_MAX_REL  # weights, inputs


class Diff:
    """What comparing one file found: structural problems, and over its floating tensors the largest |difference|
    and how many tensors were not bitwise equal."""

    def __init__(self):
        self.problems, self.max_abs, self.unequal, self.over = [], 0.0, 0, []

    def tensors(self, where, new, ref, tol_abs, tol_rel):
        if type(new) is not type(ref):
            self.problems.append(f"{where}: {type(new).__name__} vs {type(ref).__name__}")
        if new.dtype != ref.dtype or new.shape != ref.shape:
            self.problems.append(f"{where}: {new.dtype}{list(new.shape)} vs {ref.dtype}{list(ref.shape)}")
            return
        if torch.equal(new, ref) and new.stride() == ref.stride() or new.numel() == 0:
            return
        if torch.equal(new, ref):  # same values, another layout (a view saved differently)
            self.problems.append(f"{where}: strides {new.stride()} vs {ref.stride()}")
            return
        self.unequal += 1
        if not (new.is_floating_point() or new.is_complex()):
            self.problems.append(f"{where}: integer values differ")
            return
        a, b = new.double(), ref.double()
        if not torch.equal(a.isfinite(), b.isfinite()) or not torch.equal(a[~a.isfinite()], b[~b.isfinite()]):
            self.problems.append(f"{where}: non-finite values differ")
            return
        d = (a - b)[a.isfinite()].abs().max().item()
        self.max_abs = max(self.max_abs, d)
        allowed = max(tol_abs, tol_rel * b[b.isfinite()].abs().max().item())
        if d > allowed:
            self.over.append(f"{where}: max |diff| {d:.3g} > {allowed:.3g}")

    def values(self, where, new, ref, tol_abs, tol_rel):
        if isinstance(ref, torch.Tensor) and isinstance(new, torch.Tensor):
            self.tensors(where, new, ref, tol_abs, tol_rel)
        elif isinstance(ref, dict) and isinstance(new, dict):
            if list(new) != list(ref):
                self.problems.append(f"{where}: keys {list(new)} vs {list(ref)}")
            for k in ref:
                if k in new:
                    self.values(f"{where}[{k!r}]", new[k], ref[k], tol_abs, tol_rel)
        elif isinstance(ref, (list, tuple)) and type(new) is type(ref) and len(new) == len(ref):
            for i, (n, r) in enumerate(zip(new, ref)):
                self.values(f"{where}[{i}]", n, r, tol_abs, tol_rel)
        elif isinstance(ref, argparse.Namespace) and isinstance(new, argparse.Namespace):
            self.values(f"{where}.__dict__", vars(new), vars(ref), tol_abs, tol_rel)
        elif type(new) is not type(ref) or new != ref:
            self.problems.append(f"{where}: {new!r} vs {ref!r}")


def load_file(path):
    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)  # our own files; checkpoint.pth holds a Namespace


def compare(out, ref, files, new_manifest):
    """Compares each file written (relative paths) with its namesake in ref; prints one line per file and
    returns whether all agree within tolerance."""
    ref_manifest = {}
    if os.path.exists(os.path.join(ref, "manifest.json")):
        with open(os.path.join(ref, "manifest.json")) as f:
            ref_manifest = json.load(f)
    differ = []
    print(f"compare {out} with {ref}:")
    for rel in sorted(files):
        ref_path = os.path.join(ref, rel)
        if not os.path.exists(ref_path):
            print(f"  NEW        {rel}: not in {ref}")
            differ.append(rel)
            continue
        tol_abs, tol_rel = tolerance_for(rel, ref_manifest)
        diff = Diff()
        new_obj, ref_obj = load_file(os.path.join(out, rel)), load_file(ref_path)
        if rel.endswith(".safetensors"):  # a mapping without order: compare by name
            if sorted(new_obj) != sorted(ref_obj):
                diff.problems.append(f"keys {sorted(set(new_obj) ^ set(ref_obj))} in only one")
            new_obj = {k: new_obj[k] for k in ref_obj if k in new_obj}
            ref_obj = {k: ref_obj[k] for k in new_obj}
        diff.values("", new_obj, ref_obj, tol_abs, tol_rel)
        if diff.problems or diff.over:
            differ.append(rel)
            print(f"  DIFFERENT  {rel}: " + "; ".join(diff.problems + diff.over))
        elif diff.unequal:
            print(f"  within     {rel}: max |diff| {diff.max_abs:.3g} (tolerance {tol_abs:g}"
                  + (f", or {tol_rel:g} of the largest value" if tol_rel else "") + ")")
        else:
            print(f"  bitwise    {rel}")
    for name, entry in sorted(new_manifest.items()):
        old = ref_manifest.get(name)
        if old is None:
            print(f"  NEW        manifest.json[{name!r}]")
            differ.append(f"manifest.json[{name!r}]")
            continue
        keys = sorted(k for k in set(entry) | set(old) if entry.get(k) != old.get(k))
        if keys:
            differ.append(f"manifest.json[{name!r}]")
        print(f"  {'DIFFERENT' if keys else 'same':<10} manifest.json[{name!r}]"
              + (f": {', '.join(keys)} differ" if keys else " (config, parameters, shapes, note, tolerance)"))
    if differ:
        print(f"compare: {len(differ)} differ from {ref} (see above): {', '.join(differ)}", file=sys.stderr)
    else:
        print(f"compare: all {len(files)} files agree with {ref} within tolerance")
    return not differ


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvit-repo", help="a checkout of github.com/zhoudaquan/dvit_repo (without it the DeepViT "
                        "fixtures are skipped)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                      "fixtures"), help="output folder (default tests/fixtures)")
    parser.add_argument("--only", help="comma-separated groups: " + ",".join(GROUPS) + " (default all)")
    parser.add_argument("--compare", metavar="REF", help="then compare what was written with the fixtures in REF; "
                        "exit 1 when they differ")
    args = parser.parse_args()
    groups = list(GROUPS)
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            parser.error(f"--only: unknown group(s) {', '.join(unknown)}; expected {','.join(GROUPS)}")
    if args.compare and os.path.realpath(args.compare) == os.path.realpath(args.out):
        parser.error("--compare must name another folder than --out")
    files, manifest = generate(args.out, groups, args.dvit_repo)
    if args.compare and not compare(args.out, args.compare, [rel for _, rel in files], manifest):
        sys.exit(1)


if __name__ == "__main__":
    main()
