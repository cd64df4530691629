"""How much memory any file lit_ti reads may cost: one table, checked from declared sizes before anything is
allocated or decompressed (files come from strangers; a 5 MB zip can declare 6 GB).

Sizes, from real files: an embedding is KBs (75 SDXL vectors in float32 are 0.6 MB); the largest A1111
hypernetworks (`1, 4, 4, 1` at all five widths) hold a few hundred MB of float32; LoRAs up to ~2 GB; an SD
checkpoint is 2–7 GB.
Each cap is ~100x (embeddings) or ~3x (hypernetworks) the largest real file, so no real file is refused.
Independently of the caps, tensors may not claim more than `EXPANSION` times the bytes the file really has
(a tensor's data is in the file; fp16 -> fp32 doubles it, uint8 -> fp32 quadruples it), so a small file
always stays small in memory whatever it declares.
"""

from dataclasses import dataclass

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Limits:
    file_bytes: int  # the file on disk
    tensor_bytes: int  # all its tensors together, counted as float32 (what we convert them to)
    pickle_bytes: int  # the pickle stream itself (`data.pkl`), which unpickles to ~10x its size in objects


LIMITS = {
    "embedding": Limits(file_bytes=256 * MiB, tensor_bytes=256 * MiB, pickle_bytes=16 * MiB),
    "hypernetwork": Limits(file_bytes=1 * GiB, tensor_bytes=2 * GiB, pickle_bytes=64 * MiB),
    # the largest real LoRAs (SDXL, rank 256, every linear layer) are ~1.7 GB in fp16
    "lora": Limits(file_bytes=4 * GiB, tensor_bytes=8 * GiB, pickle_bytes=64 * MiB),
    "checkpoint": Limits(file_bytes=64 * GiB, tensor_bytes=128 * GiB, pickle_bytes=512 * MiB),
}
EXPANSION = 4  # tensor bytes (as float32) per byte of file, at most
ZIP_RATIO = 8  # a compressed zip entry may expand this much (torch stores entries; float data barely deflates)
ZIP_ENTRIES = 100_000  # an SDXL checkpoint has ~2,600
OBJECTS = 1_000_000  # containers and tensors in one loaded pickle
PNG_PIXELS = 16_000_000  # an A1111 embedding PNG is ~1 Mpx (the preview plus two data blocks)
PNG_PAYLOAD_BYTES = 16 * MiB  # its JSON: 75 SD2 vectors are ~2 MB of text
HYPERNETWORK_LAYERS = 16  # entries of `layer_structure` (A1111 files have 3-5)
HYPERNETWORK_WIDTH = 8192  # a context width (SD: 320..1280, SDXL: 2048)


def mb(n: int) -> str:
    """Bytes for messages: `12.3 MB`."""
    return f"{n / 1e6:.1f} MB"


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2}
SAFETENSORS_DTYPE_BYTES |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(path, what: str) -> dict:
    """A `.safetensors` file's header (`{name: {dtype, shape, data_offsets}}`), refused (ValueError) before
    anything is loaded when its header or its tensors are larger than the caps or than the file."""
    import json
    import math
    import os

    limits, size = LIMITS[what], os.path.getsize(path)
    if size > limits.file_bytes:
        raise ValueError(f"is {mb(size)}; {what} files are at most {mb(limits.file_bytes)}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, limits.pickle_bytes):
            raise ValueError(f"its header claims {mb(n)} in a file of {mb(size)}")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    total, budget = 0, min(limits.tensor_bytes, EXPANSION * size + MiB)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} has no valid shape")
        elements = math.prod(shape)
        total += elements * max(4, SAFETENSORS_DTYPE_BYTES.get(info.get("dtype"), 8))
        if elements * SAFETENSORS_DTYPE_BYTES.get(info.get("dtype"), 1) > size or total > budget:
            raise ValueError(f"its tensors declare {mb(total)}, more than a file of {mb(size)} holds")
    return header
