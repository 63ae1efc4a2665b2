"""Fixtures for tests/test_pickle.cpp: small files written by Python's torch.save, each tensor file with a
.safetensors twin holding the same tensors (contiguous copies) so the test checks the pickle reader against
another format. Values that are not tensors are literals the test spells out.
Run from the repository root with Debian's python3-torch: /usr/bin/python3 scripts/make_pickle_fixtures.py"""
import argparse
import json
import os
import struct

import torch

OUT = "tests/fixtures/pickle"


def save_safetensors(path, tensors):
    """Write a dict of tensors in the safetensors layout (8-byte LE header size, JSON, raw data)."""
    dt = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        b = v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes()
        header[k] = {"dtype": dt[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def out(name):
    return os.path.join(OUT, name)


def small_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 2 * 2, 2))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 2, 2, 2))  # running statistics and num_batches_tracked move off their defaults
    return model


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)

    model = small_model()
    sd = model.state_dict()  # an OrderedDict with _metadata
    torch.save(sd, out("state_dict.pt"))
    save_safetensors(out("state_dict.safetensors"), sd)

    # Adam keeps a 0-d float `step` tensor and two buffers per parameter, keyed by parameter index.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 2, 2, 2)).sum().backward()
    optimizer.step()
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
            "args": argparse.Namespace(lr=0.1)}
    torch.save(ckpt, out("checkpoint.pth"))
    twin = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for index, state in ckpt["optimizer"]["state"].items():
        for k, v in state.items():
            twin[f"optimizer.{index}.{k}"] = v
    save_safetensors(out("checkpoint.safetensors"), twin)

    # Views of one storage: the file holds it once.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"base": base, "slice": base[1:3, ::2], "transposed": base.t(), "row": base[2], "element": base[3, 5]}
    torch.save(views, out("views.pt"))
    save_safetensors(out("views.safetensors"), views)

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
    torch.save(dtypes, out("dtypes.pt"))
    save_safetensors(out("dtypes.safetensors"), dtypes)

    parameter = torch.nn.Parameter(torch.randn(3, 2))
    torch.save(parameter, out("parameter.pt"))
    tensor = torch.randn(2, 3)
    torch.save(tensor, out("tensor.pt"))
    save_safetensors(out("tensors.safetensors"), {"parameter": parameter, "tensor": tensor})

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
        torch.save(values, out(f"values_p{protocol}.pt"), pickle_protocol=protocol)


if __name__ == "__main__":
    main()
