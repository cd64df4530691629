"""The `hostile` and `big_hostile` fixtures: files a stranger could hand us (a pytest plugin that
tests/conftest.py loads)."""

from pathlib import Path

import pytest
import torch
from PIL import Image


# ---------------------------------------------------------------- hostile files (readers' trust tests)
def _zip_bomb(path: Path, inflated: int) -> Path:
    """A torch zip whose storage entry deflates `inflated` bytes of zeros into a few KB (what a loader
    that trusts the zip directory allocates)."""
    import zipfile

    buffer = __import__("io").BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(2, 8)}}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with out.open(entry, "w", force_zip64=True) as f:
                    chunk = bytes(2**24)
                    for _ in range(inflated // len(chunk)):
                        f.write(chunk)
            else:
                out.writestr(info.filename, src.read(info))
    return path


def _legacy_storage_lie(path: Path, numel: int) -> Path:
    """torch's legacy format, declaring one float storage of `numel` elements and holding 64 bytes."""
    import collections
    import pickle

    class Marker:
        pass

    class Tensor_:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Marker, 0, (numel,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is Marker else None

    with open(path, "wb") as f:
        for record in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(record, f, protocol=2)
        Pickler(f, protocol=2).dump({"emb_params": Tensor_()})
        pickle.dump(["0"], f, protocol=2)
        f.write((16).to_bytes(8, "little") + bytes(64))
    return path


def _png_zlib_bomb(path: Path, inflated: int) -> Path:
    """An A1111 pixel-only embedding PNG whose payload inflates to `inflated` bytes of JSON whitespace."""
    import zlib

    import numpy as np

    from lit_ti.io.png_embeddings import encode_blocks

    deflate = zlib.compressobj(9)
    chunk = b" " * 2**24
    payload = b"".join(deflate.compress(chunk) for _ in range(inflated // len(chunk))) + deflate.flush()
    low, high = encode_blocks(payload, 64, torch.ones(8))
    gap = np.zeros((64, 1, 3), dtype=np.uint8)
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    Image.fromarray(np.concatenate([low, gap, grey, gap, high], axis=1)).save(path)
    return path


def _png_text(path: Path, data: dict) -> Path:
    """An A1111 PNG embedding carrying `data` in its text chunk only (NaN allowed, as json writes it)."""
    import base64

    from PIL import PngImagePlugin

    from lit_ti.io.png_embeddings import to_json

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(to_json(data)).decode("ascii"))
    Image.new("RGB", (32, 32), (90, 90, 90)).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """Files a stranger could hand us, each small: bombs, lying sizes, non-finite values, and the one odd but
    honest layout (an original-TI `.pt` with `string_to_param` as an `nn.ParameterDict`). Width 32 (tiny)."""
    import json
    import struct

    from lit_ti import io
    from lit_ti.io.embeddings import a1111_dict
    from lit_ti.modules.hypernetwork import Hypernetwork

    d = tmp_path_factory.mktemp("hostile")
    nan = torch.randn(2, 32)
    nan[0, 3] = float("nan")
    files = {
        "zip_bomb": _zip_bomb(d / "zipbomb.pt", 2**27),
        "legacy_lie": _legacy_storage_lie(d / "legacylie.pt", 10**11),
        "png_bomb": _png_zlib_bomb(d / "pngbomb.png", 2**26),
        "nan_pt": d / "nanvec.pt",
        "nan_safetensors": d / "nanvec.safetensors",
        "nan_png": _png_text(d / "nanpng.png", a1111_dict(nan, "nanpng")),
        "stride0": d / "stride0.pt",
        "st_lie": d / "stlie.safetensors",
        "hn_structure": d / "hnbomb.pt",
        "hn_nan": d / "hnnan.pt",
        "huge": d / "overflow.pt",
        "parameterdict": d / "origti.pt",
    }
    torch.save(a1111_dict(nan, "nanvec"), files["nan_pt"])
    from safetensors.torch import save_file

    save_file({"emb_params": nan}, files["nan_safetensors"])
    torch.save({"emb_params": torch.zeros(1).expand(10**9)}, files["stride0"])
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    files["st_lie"].write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    hn = Hypernetwork([32], layer_structure=[1, 2, 1])
    io.save_hypernetwork(files["hn_structure"], hn)
    data = torch.load(files["hn_structure"], weights_only=True)
    widths = {1280: data.pop(32), "layer_structure": [1, 4000, 1]}  # KBs of weights declaring 100 GB of modules
    torch.save({**data, **widths}, files["hn_structure"])
    data[32] = widths[1280]
    with torch.no_grad():
        hn.pair(32)[0].linear[0].weight[0, 0] = float("inf")
    torch.save({**data, 32: (hn.pair(32)[0].state_dict(), hn.pair(32)[1].state_dict())}, files["hn_nan"])
    io.save_embedding(files["huge"], torch.full((2, 32), 1e30))  # finite, but overflows any model
    vectors = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, 32))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": vectors}, files["parameterdict"])
    return files


@pytest.fixture(scope="session")
def big_hostile(tmp_path_factory, hostile) -> dict[str, Path]:
    """The bombs at full size (seconds to build): a 6 GiB zip bomb (~6 MB), a PNG whose pixels inflate to
    2.4 GB, next to the small hostile files."""
    d = tmp_path_factory.mktemp("big_hostile")
    return {
        **hostile,
        "zip_bomb": _zip_bomb(d / "zipbomb6g.pt", 6 * 2**30),
        "png_bomb": _png_zlib_bomb(d / "pngbomb2g.png", 144 * 2**24),
    }
