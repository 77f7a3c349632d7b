"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) from the repository's own
inputs: the TOML blocks of the docs and the deploy configs, the test CNN (tests/fixtures/models/
cnn.py, made small), safetensors bodies and sample batches as the tests send them, OCI manifests
as the registry stores them, compressed updates as the quantize plugin encodes them, small PNG and
JPEG images (with Pillow), and job specs from a demo's cloud.db when one is given.

usage: python3 fuzz/seed.py [--demo-workdir DIR]   (DIR: `nereid demo --rounds 1 --workdir DIR`;
       Python needs Pillow: `python3 -m venv target/py-seed && target/py-seed/bin/pip install pillow`)
"""
import argparse
import glob
import hashlib
import io
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    header, offset, body = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        body += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demo-workdir")
    args = p.parse_args()

    # TOML: every ```toml block of the docs and README, and the deploy configs.
    for md in glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]:
        for block in re.findall(r"```toml\n(.*?)```", open(md).read(), re.S):
            put("toml_configs", block)
    for f in glob.glob(os.path.join(ROOT, "deploy", "**", "*.toml"), recursive=True):
        put("toml_configs", open(f).read())

    # Safetensors: what uploads, models and sample batches look like.
    f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
    batch = safetensors([("x", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6)), ("y", "I64", [2], struct.pack("<2q", 0, 1))])
    model = safetensors([("w", "F32", [2, 2], f32(0.5, -1, 2, 3)), ("b", "F64", [2], struct.pack("<2d", 1, 2))],
                        {"nereid": "update"})
    image = safetensors([("image", "F32", [1, 3, 2, 2], f32(*range(12)))])
    for s in (batch, model, image, safetensors([])):
        put("safetensors", s)
    put("sample_batch", batch)
    put("sample_batch", safetensors([("x", "U8", [1, 4], bytes(4)), ("y", "I32", [1], struct.pack("<i", 3))]))

    # Inference request bodies: the first byte picks the content type (0 JSON, 2 safetensors).
    put("infer_request", b"\x00" + b'{"shape": [1, 3], "data": [1.0, -2.5e-3, 3]}')
    put("infer_request", b"\x00" + b'{"inputs": {"image": {"shape": [1, 2], "data": [0.5, 1e300]}}}')
    put("infer_request", b"\x02" + image)

    # Compressed updates of an 8-feature, 2-class MLP as the quantize plugin encodes them: int8
    # values with a scale, or top-k indices, values and the dense shape. The first byte is the round.
    i8 = lambda *v: struct.pack(f"<{len(v)}b", *v)
    int8 = safetensors([("dense.0.weight#int8", "I8", [2, 8], i8(*range(-8, 8))),
                        ("dense.0.weight#scale", "F32", [], f32(0.01)),
                        ("dense.0.bias#int8", "I8", [2], i8(127, -127)),
                        ("dense.0.bias#scale", "F32", [], f32(0.5))], {"nereid": "update"})
    top_k = safetensors([("dense.0.weight#indices", "I32", [3], struct.pack("<3i", 0, 7, 15)),
                         ("dense.0.weight#values", "F32", [3], f32(0.5, -0.25, 1)),
                         ("dense.0.weight#shape", "I64", [2], struct.pack("<2q", 2, 8)),
                         ("dense.0.bias", "F32", [2], f32(0.1, -0.1))])
    put("update_decode", b"\x00" + int8)
    put("update_decode", b"\x03" + top_k)

    # Images: the first byte picks the content type (0 PNG, 1 JPEG), the input shape and layout.
    from PIL import Image
    for size, mode in [((8, 8), "RGB"), ((16, 16), "L"), ((5, 3), "RGB")]:
        picture = Image.new(mode, size)
        picture.putdata([(x * 37 + y * 11) % 256 if mode == "L" else ((x * 37) % 256, (y * 53) % 256, 90)
                         for y in range(size[1]) for x in range(size[0])])
        for pick, fmt in [(0, "PNG"), (1, "JPEG"), (0x84, "PNG")]:
            out = io.BytesIO()
            picture.save(out, fmt)
            put("image_adapter", bytes([pick]) + out.getvalue())

    # ONNX: the test CNN, small, with and without the stem.
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("cnn", ["--size", "8", "--width", "2"]), ("stem", ["--size", "16", "--width", "2", "--stem"])]:
            out = os.path.join(tmp, name + ".onnx")
            subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fixtures", "models", "cnn.py"), out] + extra,
                           check=True)
            put("onnx_model", open(out, "rb").read())

    # OCI manifests: media-type byte, tag, newline, body (a Wasm component as wkg pushes it, an index).
    layer = {"mediaType": "application/wasm", "digest": "sha256:" + "ab" * 32, "size": 1234}
    config = {"mediaType": "application/vnd.wasm.config.v0+json", "digest": "sha256:" + "cd" * 32, "size": 56}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/wasm", "config": config, "layers": [layer],
                "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": manifest["mediaType"], "digest": "sha256:" + "ef" * 32, "size": 400,
                            "platform": {"architecture": "wasm", "os": "wasip2"}}]}
    put("registry_manifest", b"\x00v1\n" + json.dumps(manifest).encode())
    put("registry_manifest", b"\x01latest\n" + json.dumps(index).encode())

    # Upload sessions: open, append with and without a range, close with the digest; a monolithic push.
    put("registry_uploads", bytes([0, 0, 1, 4]) + b"abcd" + bytes([2, 3]) + b"efg" + bytes([3, 0, 5, 0]))
    put("registry_uploads", bytes([7, 5]) + b"hello" + bytes([0, 0, 6, 0, 5, 0]))

    # Job specs as the cloud keeps them (what `POST /v1/jobs` takes).
    if args.demo_workdir:
        db = sqlite3.connect(os.path.join(args.demo_workdir, "cloud.db"))
        for (spec,) in db.execute("SELECT spec FROM jobs"):
            put("job_spec", spec)
        for f in glob.glob(os.path.join(args.demo_workdir, "*.toml")):
            put("toml_configs", open(f).read())


if __name__ == "__main__":
    main()
