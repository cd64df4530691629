"""Reading `.pt`/`.bin`/`.ckpt` pickles without ever running code from them, within a memory budget, and
writing `.pt` files that every other tool's loader accepts.

Reading, in three steps:
1. *Pre-scan* (nothing allocated): the zip directory (entry count, declared sizes, compression ratio, entries
   overlapping) or the legacy format's records; then the pickle is walked by a recorder whose every global is
   an inert stub, to collect the storage sizes it declares, each checked against the bytes really present.
2. `torch.load(weights_only=True)`: only tensors and plain containers are rebuilt; a pickle that asks for any
   other global (`os.system`, a class with `__reduce__`, ...) is refused before anything runs. One addition:
   `torch.nn.ParameterDict` (how original-TI files hold `string_to_param`, and what A1111's own unpickler
   allows) resolves to `ParameterDictStandIn`, a dict that only keeps the tensors; the real class never runs.
3. Every tensor is checked: dense, on the CPU, and all of them together within the caps (a tensor can view
   a small storage with stride 0 and claim any size).
The caps are in `lit_ti.io.limits`.

Writing (`save_pt`): torch's zip layout with only the entries A1111's safe unpickler allows
(`<dir>/data.pkl`, `<dir>/data/<n>`, `<dir>/version`), each stored uncompressed and 64-byte aligned, so that
`torch.load(mmap=True, weights_only=True)` (ComfyUI's `--mmap-torch-files`) maps it as well.
"""

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from lit_ti.errors import UserError
from lit_ti.io.limits import EXPANSION, LIMITS, OBJECTS, ZIP_ENTRIES, ZIP_RATIO, Limits, mb

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
ELEMENT_BYTES = {
    **dict.fromkeys(("ByteStorage", "CharStorage", "BoolStorage", "QUInt8Storage", "QInt8Storage"), 1),
    **dict.fromkeys(("HalfStorage", "BFloat16Storage", "ShortStorage"), 2),
    **dict.fromkeys(("FloatStorage", "IntStorage", "QInt32Storage", "ComplexHalfStorage"), 4),
    **dict.fromkeys(("DoubleStorage", "LongStorage", "ComplexFloatStorage"), 8),
    "UntypedStorage": 1,
}  # unknown storage types count as 16 bytes an element (the widest there is)


class ParameterDictStandIn(dict):
    """What an `nn.ParameterDict` in a file becomes: `{key: tensor}`, nothing else of the module's state."""

    def __setstate__(self, state: Any) -> None:
        params = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(params, dict):
            self.update({k: v for k, v in params.items() if isinstance(v, torch.Tensor)})

    @property
    def _parameters(self) -> dict:  # the attribute A1111 and older readers look for
        return self


STAND_INS = [(ParameterDictStandIn, "torch.nn.modules.container.ParameterDict")]


# ----------------------------------------------------------------- pre-scan
class _Refused(ValueError):
    """A file over the caps, or one whose declared sizes do not fit its bytes."""


class _Stub:
    """Every global of a pickle, during the pre-scan: accepts anything, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Recorder(pickle.Unpickler):
    """Walks a pickle without resolving any global; collects `{storage key: declared bytes}`."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, int] = {}
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        key = (str(module), str(name))
        if key not in self._classes:
            self._classes[key] = type(str(name), (_Stub,), {})
        return self._classes[key]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            numel = pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"a storage with {numel!r} elements")
            nbytes = numel * ELEMENT_BYTES.get(getattr(pid[1], "__name__", ""), 16)
            key = str(pid[2])
            self.storages[key] = max(nbytes, self.storages.get(key, 0))
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module" and isinstance(pid[1], type):
            return pid[1]  # the legacy format saves a module's class as a persistent id
        return _Stub()


def _record(stream) -> _Recorder:
    recorder = _Recorder(stream)
    recorder.load()
    return recorder


def _scan_zip(path: Path, size: int, limits: Limits) -> None:
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if not infos or len(infos) > ZIP_ENTRIES:
            raise _Refused(f"a zip with {len(infos)} entries")
        declared = sum(i.file_size for i in infos)
        if sum(i.compress_size for i in infos) > size:
            raise _Refused("zip entries overlap (their sizes add up to more than the file)")
        for i in infos:
            ratio_ok = i.file_size <= ZIP_RATIO * i.compress_size + 1024
            if not ratio_ok or (i.compress_type == zipfile.ZIP_STORED and i.file_size != i.compress_size):
                raise _Refused(f"entry {i.filename} declares {mb(i.file_size)} from {mb(i.compress_size)}")
        if declared > max(limits.file_bytes, size):
            raise _Refused(f"its entries declare {mb(declared)} in all")
        entries = {i.filename: i for i in infos}
        archive = infos[0].filename.split("/", 1)[0]  # torch reads the folder of the first entry
        pkl = entries.get(f"{archive}/data.pkl")
        if pkl is None or pkl.file_size > limits.pickle_bytes:
            raise _Refused("no data.pkl" if pkl is None else f"its pickle is {mb(pkl.file_size)}")
        with z.open(pkl) as stream:
            storages = _record(stream).storages
    for key, nbytes in storages.items():
        entry = entries.get(f"{archive}/data/{key}")
        if entry is None or nbytes > entry.file_size:
            raise _Refused(f"storage {key} declares {mb(nbytes)} but its entry holds less")


def _scan_legacy(path: Path, size: int, limits: Limits) -> None:
    with open(path, "rb") as f:
        records = []
        for _ in range(3):  # magic number, protocol version, sys info
            records.append(pickle.Unpickler(_Limited(f, limits.pickle_bytes)).load())
        if records[0] != LEGACY_MAGIC or records[1] != 1001:
            raise _Refused("neither a torch zip archive nor torch's legacy format")
        storages = _record(_Limited(f, limits.pickle_bytes)).storages
        pickle.Unpickler(_Limited(f, limits.pickle_bytes)).load()  # the storage keys
        left = size - f.tell()
    declared = sum(n + 8 for n in storages.values())  # each record: an 8-byte count, then the data
    if declared > left:
        raise _Refused(f"its storages declare {mb(declared)} but the file has {mb(left)} left")


class _Limited(io.RawIOBase):
    """A file read through a budget: a pickle that goes on longer than `limit` bytes is refused."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            raise _Refused("its pickle is longer than allowed")
        n = self.f.readinto(memoryview(buffer)[: self.left])
        self.left -= n
        return n

    def readline(self, size=-1) -> bytes:
        line = self.f.readline(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(line)
        return line


def _prescan(path: Path, size: int, limits: Limits) -> None:
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # the test torch.load makes
    try:
        (_scan_zip if zipped else _scan_legacy)(path, size, limits)
    except _Refused as e:
        raise UserError(f"{path}: refused: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: refused: its pickle is nested too deeply") from None
    except Exception as e:  # anything zipfile or the pickle machinery raises on garbage
        raise UserError(
            f"{path}: not a torch file, or a damaged one ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


# ----------------------------------------------------------------- after loading
def check_tensors(obj: Any, path: Path, size: int, limits: Limits) -> None:
    """Every tensor in `obj` dense and on the CPU, all of them (as float32) within the caps."""
    budget = min(limits.tensor_bytes, EXPANSION * size + 2**20)
    total, seen, stack = 0, 0, [obj]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > OBJECTS:
            raise UserError(f"{path}: refused: holds more than {OBJECTS} objects")
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided or item.device.type != "cpu" or item.is_quantized:
                raise UserError(f"{path}: refused: holds a {item.layout} tensor on {item.device}; only dense ones load")
            total += item.numel() * max(4, item.element_size())
            if total > budget:
                raise UserError(
                    f"{path}: refused: its tensors claim {mb(total)}, more than the {mb(budget)} a file of "
                    f"{mb(size)} can hold"
                )
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)


def _message(path: Path, what: str, e: Exception) -> str:
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        call = found.group(1) if found else "a non-tensor object"
        return (
            f"{path}: refused: loading this {what} would call {call}, which can run code; only files holding "
            "tensors and plain containers load. Ask for a .safetensors file instead"
        )
    article = "an" if what[0] in "aeiou" else "a"
    return f"{path}: cannot be read as {article} {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def load_pickle(path: Path, what: str) -> Any:
    """The file's contents (tensors, dicts, lists, numbers, strings only); a UserError for anything else.

    `what` (`embedding`, `hypernetwork`, `checkpoint`) picks the caps in `lit_ti.io.limits.LIMITS`.
    """
    path, limits = Path(path), LIMITS[what]
    size = path.stat().st_size
    if size > limits.file_bytes:
        raise UserError(f"{path}: is {mb(size)}; {what} files are at most {mb(limits.file_bytes)}. Is it a {what}?")
    _prescan(path, size, limits)
    try:
        with torch.serialization.safe_globals(STAND_INS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except RecursionError:
        raise UserError(f"{path}: refused: its pickle is nested too deeply") from None
    except Exception as e:
        raise UserError(_message(path, what, e)) from None
    check_tensors(data, path, size, limits)
    return data


# ----------------------------------------------------------------- writing
def save_pt(obj: Any, path: Path) -> Path:
    """`obj` as a `.pt` that torch, A1111's safe unpickler and ComfyUI's mmap loader all read (see top).
    Writes `path` directly: callers pass the temp file of an `atomic_path`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as src, open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            if name not in ("data.pkl", "version") and not re.fullmatch(r"data/\d+", name):
                continue  # .format_version, .storage_alignment, byteorder, .data/serialization_id
            entry = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # pad the local header's extra field (torch's "FB" id) so the data starts 64-byte aligned
            start = f.tell() + 30 + len(entry.filename) + 4
            pad = -start % 64
            entry.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
            out.writestr(entry, src.read(info))
    return Path(path)
