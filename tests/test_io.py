import collections
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_ti import io
from lit_ti.errors import UserError

# --- the webui's safe-unpickler rules (reference/a1111.md §1.6), re-stated here to check our files -------
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
WEBUI_ZIP_ENTRY = r"^[^/]+/(data\.pkl|version|byteorder|\.data/serialization_id|data/\d+)$"


class _WebuiUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in WEBUI_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return collections.OrderedDict if name == "OrderedDict" else (lambda *a, **k: None)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"


def webui_accepts(path: Path) -> bool:
    """True if the A1111 webui's pre-load check would let this file through."""
    import re

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(not re.match(WEBUI_ZIP_ENTRY, n) for n in names):
                return False
            pkl = [n for n in names if n.endswith("data.pkl")]
            if len(pkl) != 1:
                return False
            data = z.read(pkl[0])
        import io as _io

        _WebuiUnpickler(_io.BytesIO(data)).load()
        return True
    with open(path, "rb") as f:
        unpickler = _WebuiUnpickler(f)
        for _ in range(5):  # magic, protocol, sys info, the object, storage keys
            unpickler.load()
    return True


# --- our files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_round_trip(tmp_path, suffix):
    v = torch.randn(3, 32)
    path = io.save_embedding(tmp_path / f"my-thing{suffix}", v, step=7, sd_checkpoint="abc", sd_checkpoint_name="m")
    loaded = io.load_embedding(path)
    assert list(loaded) == ["my-thing"]
    assert torch.equal(loaded["my-thing"], v)
    assert loaded["my-thing"].dtype == torch.float32


def test_a1111_pt_layout(tmp_path):
    v = torch.randn(2, 32, dtype=torch.float16, requires_grad=True)
    path = io.save_embedding(
        tmp_path / "x.pt", v, name="x-500", step=500, sd_checkpoint="0123456789", sd_checkpoint_name="m"
    )
    data = torch.load(path, weights_only=True)
    assert type(data) is dict
    assert set(data) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert data["string_to_token"] == {"*": 265}
    assert data["string_to_param"]["*"].dtype == torch.float32
    assert data["string_to_param"]["*"].device.type == "cpu"
    assert torch.equal(data["string_to_param"]["*"], v.detach().float())
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "x-500",
        500,
        "0123456789",
        "m",
    )
    meta = io.read_embedding(path)[0]
    assert (meta.step, meta.sd_checkpoint, meta.sd_checkpoint_name) == (500, "0123456789", "m")


def test_pt_and_bin_pass_the_webui_safe_unpickler(tmp_path):
    for suffix in (".pt", ".bin"):
        assert webui_accepts(io.save_embedding(tmp_path / f"x{suffix}", torch.randn(2, 8)))
    assert webui_accepts(
        io.save_embedding(tmp_path / "xl.pt", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)})
    )


def test_webui_check_rejects_what_torch_writes_by_default(tmp_path):
    """Why we write the legacy format: current torch's zip entries fail the webui's check."""
    torch.save({"string_to_param": {"*": torch.randn(2, 8)}}, tmp_path / "zip.pt")
    assert not webui_accepts(tmp_path / "zip.pt")
    torch.save({"f": print}, tmp_path / "code.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError):
        webui_accepts(tmp_path / "code.pt")


def test_safetensors_layout(tmp_path):
    path = io.save_embedding(tmp_path / "x.safetensors", torch.randn(2, 32), step=3)
    assert list(load_file(path)) == ["emb_params"]
    xl = io.save_embedding(tmp_path / "xl.safetensors", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)})
    tensors = load_file(xl)
    assert tensors["clip_l"].shape == (2, 768) and tensors["clip_g"].shape == (2, 1280)


# --- their files -------------------------------------------------------------------------------------------
def test_reads_foreign_layouts(tmp_path):
    v = torch.randn(2, 32)
    # A1111 as the webui writes it: a grad-requiring tensor, current zip serialisation
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": v.clone().requires_grad_()},
            "name": "a",
            "step": 3,
        },
        tmp_path / "a1111.pt",
    )
    # original TI repo style with a Parameter and no name
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v.clone())}},
        tmp_path / "orig.pt",
    )
    save_file({"emb_params": v}, tmp_path / "kohya.safetensors")
    torch.save({"<tok-a>": v, "<tok-b>": v[:1]}, tmp_path / "learned_embeds.bin")  # diffusers, two tokens
    torch.save({"<one>": v[0]}, tmp_path / "one.bin")  # diffusers 1-D vector
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "sdxl.safetensors")

    assert torch.equal(io.load_embedding(tmp_path / "a1111.pt")["a1111"], v)
    assert io.read_embedding(tmp_path / "a1111.pt")[0].step == 3
    assert torch.equal(io.load_embedding(tmp_path / "orig.pt")["orig"], v)
    assert torch.equal(io.load_embedding(tmp_path / "kohya.safetensors")["kohya"], v)
    multi = io.load_embedding(tmp_path / "learned_embeds.bin")
    assert set(multi) == {"<tok-a>", "<tok-b>"} and multi["<tok-b>"].shape == (1, 32)
    assert io.load_embedding(tmp_path / "one.bin")["<one>"].shape == (1, 32)
    xl = io.load_embedding(tmp_path / "sdxl.safetensors")["sdxl"]
    assert xl["clip_l"].shape == (1, 768) and xl["clip_g"].shape == (1, 1280)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "payload": _Evil(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UserError, match=r"evil.pt: refused: .* would call getattr"):
        io.load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unknown_layouts_and_missing_files_are_user_errors(tmp_path):
    torch.save({"a": 1, "b": "x"}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="odd.pt"):
        io.load_embedding(tmp_path / "odd.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 8), "+": torch.zeros(1, 8)}}, tmp_path / "two.pt")
    with pytest.raises(UserError, match="2 terms"):
        io.load_embedding(tmp_path / "two.pt")
    with pytest.raises(UserError, match="no such"):
        io.load_embedding(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="junk.safetensors"):
        io.load_embedding(tmp_path / "junk.safetensors")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = io.save_embedding(tmp_path / "x.safetensors", torch.ones(1, 8))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.embeddings, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_embedding(path, torch.zeros(1, 8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left behind


def test_bank_vectors_round_trip_through_the_file_layout():
    from lit_ti.io.embeddings import from_file, to_file

    sd = {"text_encoder": torch.randn(2, 768)}
    xl = {"text_encoder": torch.randn(2, 768), "text_encoder_2": torch.randn(2, 1280)}
    assert torch.equal(to_file(sd), sd["text_encoder"])
    assert set(to_file(xl)) == {"clip_l", "clip_g"}
    for bank, widths in ((sd, {"text_encoder": 768}), (xl, {"text_encoder": 768, "text_encoder_2": 1280})):
        back = from_file(to_file(bank), widths)
        assert back.keys() == bank.keys() and all(torch.equal(back[k], bank[k]) for k in bank)
    assert from_file(to_file(sd), {"text_encoder": 768, "text_encoder_2": 1280}) is None  # SD1 file on SDXL
    assert from_file(to_file(xl), {"text_encoder": 768}) is None  # SDXL file on SD1
    assert from_file(to_file(sd), {"text_encoder": 1024}) is None  # SD1 file on SD2
