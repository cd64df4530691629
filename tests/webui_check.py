"""The A1111 webui's pre-load check on `.pt` files, re-stated to test our files against it (see
reference/a1111.md §1.6). Imported only by conftest.py, which hands `webui_accepts` to tests as a fixture."""

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

# its safe unpickler's allowed globals
WEBUI_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *{("torch", f"{t}Storage") for t in ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16")},
    ("torch", "float32"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}
# the strictest version of its zip entry check (modules/safe.py before `byteorder` was allowed)
WEBUI_ZIP_ENTRY = r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"


class _WebuiUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in WEBUI_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if name == "ParameterDict":  # the webui returns the real class; a class that does nothing stands in
            return type(name, (), {"__setstate__": lambda self, state: None})
        return collections.OrderedDict if name == "OrderedDict" else (lambda *a, **k: None)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"


def webui_accepts(path: Path) -> bool:
    """True if the A1111 webui's pre-load check would let this file through."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(not re.match(WEBUI_ZIP_ENTRY, n) for n in names):
                return False
            pkl = [n for n in names if n.endswith("data.pkl")]
            if len(pkl) != 1:
                return False
            data = z.read(pkl[0])
        _WebuiUnpickler(io.BytesIO(data)).load()
        return True
    with open(path, "rb") as f:
        unpickler = _WebuiUnpickler(f)
        for _ in range(5):  # magic, protocol, sys info, the object, storage keys
            unpickler.load()
    return True
