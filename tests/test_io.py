import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.io.pickles import save_pt


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


def test_pt_and_bin_pass_the_webui_safe_unpickler(tmp_path, webui_accepts):
    for suffix in (".pt", ".bin"):
        assert webui_accepts(io.save_embedding(tmp_path / f"x{suffix}", torch.randn(2, 8)))
    assert webui_accepts(
        io.save_embedding(tmp_path / "xl.pt", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)})
    )


def test_webui_check_rejects_what_torch_writes_by_default(tmp_path, webui_accepts):
    """Why we rewrite torch's zip: the entries current torch adds fail the webui's check."""
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
    with pytest.raises(io.paths.WriteFailed, match="x.safetensors: could not be written"):
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


# --- .pt files every loader reads -----------------------------------------------------------------------------
def _pt_files(tmp_path) -> list[Path]:
    from lit_ti.modules.hypernetwork import Hypernetwork

    return [
        io.save_embedding(tmp_path / "e.pt", torch.randn(2, 8), step=4),
        io.save_embedding(tmp_path / "e.bin", torch.randn(2, 8)),
        io.save_embedding(tmp_path / "xl.pt", {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}),
        io.save_hypernetwork(tmp_path / "h.pt", Hypernetwork([16, 24], layer_structure=[1, 2, 1]), step=2),
    ]


def test_pt_files_load_in_a1111_and_comfyui_mmap(tmp_path, webui_accepts):
    """A1111: the entry-name check and the global allowlist. ComfyUI `--mmap-torch-files`: torch.load(mmap=True,
    weights_only=True), which needs the zip layout; its entries are 64-byte aligned like torch's own."""
    for path in _pt_files(tmp_path):
        assert webui_accepts(path), path
        mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        plain = torch.load(path, map_location="cpu", weights_only=True)
        assert mapped.keys() == plain.keys()
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if "/data/" in info.filename:
                    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                    assert start % 64 == 0, (path, info.filename)


def test_hypernetwork_pt_reads_the_way_comfyui_reads_it(tmp_path):
    """ComfyUI's hypernetwork loader: integer width keys, `sd[width][0|1]` state dicts of `linear.N.weight`."""
    path = _pt_files(tmp_path)[3]
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    widths = [k for k in sd if isinstance(k, int)]
    assert widths == [16, 24]
    for width in widths:
        for state in sd[width]:
            weights = sorted(k for k in state if k.endswith(".weight"))
            assert weights == ["linear.0.weight", "linear.1.weight"]
            assert state["linear.0.weight"].shape == (2 * width, width)
    assert sd["layer_structure"] == [1.0, 2.0, 1.0] and sd["activation_func"] == "linear"


def test_original_ti_parameterdict_files_load_without_running_the_class(tmp_path, monkeypatch, webui_accepts):
    """Original TI (and old A1111) saved `string_to_param` as an nn.ParameterDict; A1111 allows that global.
    It loads as a plain stand-in: nn.ParameterDict's own code is never called."""
    vectors = torch.randn(3, 8)
    with torch.no_grad():
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    data = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}
    torch.save(data, tmp_path / "ti.pt")  # as current torch writes it
    save_pt(data, tmp_path / "ti1.pt")  # as torch 1.x did (the original TI's): data.pkl, data/<n>, version
    assert webui_accepts(tmp_path / "ti1.pt")

    def forbidden(*args, **kwargs):
        raise AssertionError("nn.ParameterDict code ran")

    for name in ("__init__", "__setstate__", "__setattr__", "update"):
        monkeypatch.setattr(torch.nn.ParameterDict, name, forbidden, raising=False)
    for name in ("ti", "ti1"):
        (entry,) = io.read_embedding(tmp_path / f"{name}.pt")
        assert entry.name == name and torch.equal(entry.vectors, vectors)


def test_hostile_files_are_one_user_error_naming_the_file(hostile):
    from lit_ti.io import load_hypernetwork, read_embedding

    for kind, path in hostile.items():
        if kind in ("huge", "parameterdict"):  # finite and honest: they load (generation refuses "huge")
            assert read_embedding(path)
            continue
        reader = load_hypernetwork if kind.startswith("hn") else read_embedding
        with pytest.raises(UserError) as caught:
            reader(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value), (kind, caught.value)


def test_caps_admit_the_largest_real_files():
    """A1111's largest hypernetworks (1, 4, 4, 1 at SD's four widths, float32) and 75 SDXL vectors."""
    from lit_ti.io.limits import LIMITS

    widths = (320, 640, 768, 1280)
    weights = sum(2 * w * w * (4 + 16 + 4) for w in widths)
    assert 4 * weights < LIMITS["hypernetwork"].file_bytes <= LIMITS["hypernetwork"].tensor_bytes
    assert LIMITS["embedding"].file_bytes / 100 > 4 * 75 * (768 + 1280)
