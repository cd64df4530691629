"""The file-format table (`io.formats`) is the only list of extensions: every place that scans for, reads or
writes a kind of file agrees with it, so a format added to a reader cannot be missed by the others."""

import pytest
import torch
from PIL import Image

from lit_ti import io
from lit_ti.errors import UserError
from lit_ti.generate import embedding_files
from lit_ti.io import formats
from lit_ti.io.loras import LoraModule
from lit_ti.modules.hypernetwork import Hypernetwork

# every suffix the table names, in both cases, plus neighbours a reader might start to accept one day
CANDIDATES = sorted(
    {s for f in formats.FORMATS for s in (f.suffix, f.suffix.upper())}
    | {".pth", ".pkl", ".jpg", ".jpeg", ".gif", ".txt", ".json", ".npz", ".yaml", ".gguf"}
)


def accepts(read, path) -> bool:
    """Whether `read` takes `path` as one of its file types (a damaged file still counts: it was tried)."""
    try:
        read(path)
    except UserError as e:
        return "unsupported" not in str(e)
    except Exception:
        return True
    return True


def test_generate_finds_every_embedding_file_the_reader_accepts(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for i, suffix in enumerate(CANDIDATES):  # distinct stems: .pt and .PT may share a name on some filesystems
        (folder / f"thing{i}{suffix}").write_bytes(b"not really an embedding")
    read = {p.name for p in folder.iterdir() if accepts(io.read_embedding, p)}
    found = {p.name for p in embedding_files(str(folder), [])}
    assert read == found
    assert {p.suffix.lower() for p in folder.iterdir() if p.name in read} == set(formats.readable(formats.EMBEDDING))
    assert ".ckpt" in formats.readable(formats.EMBEDDING)  # original TI's files (the drift that was)


def test_single_file_models_accept_exactly_the_table(tmp_path):
    from lit_ti.models import SingleFile

    read = set()
    for i, suffix in enumerate(CANDIDATES):
        path = tmp_path / f"model{i}{suffix}"
        path.write_bytes(b"not really a checkpoint")
        try:
            SingleFile(str(path)).load()
        except UserError as e:
            if "not a checkpoint file" in str(e):
                continue
        read.add(suffix.lower())
    assert read == set(formats.readable(formats.MODEL))


def test_hypernetwork_reader_accepts_exactly_the_table(tmp_path):
    read = set()
    for i, suffix in enumerate(CANDIDATES):
        path = tmp_path / f"style{i}{suffix}"
        path.write_bytes(b"not really a hypernetwork")
        if accepts(io.load_hypernetwork, path):
            read.add(suffix.lower())
    assert read == set(formats.readable(formats.HYPERNETWORK))


def test_lora_reader_accepts_exactly_the_table(tmp_path):
    read = set()
    for i, suffix in enumerate(CANDIDATES):
        path = tmp_path / f"lora{i}{suffix}"
        path.write_bytes(b"not really a LoRA")
        if accepts(io.read_lora, path):
            read.add(suffix.lower())
    assert read == set(formats.readable(formats.LORA))


@pytest.mark.parametrize("fmt", formats.exportable(formats.LORA))
def test_every_lora_format_written_reads_back(tmp_path, fmt):
    module = LoraModule(torch.randn(2, 32), torch.randn(16, 2), torch.tensor(2.0))
    path = io.save_lora(
        tmp_path / f"zz-thing-lora.{fmt}", {"lora_unet_a_to_q": module}, {"zz-thing": torch.randn(1, 32)}
    )
    back = io.read_lora(path)
    assert torch.equal(back.modules["lora_unet_a_to_q"].up, module.up)
    assert torch.equal(back.embeddings["zz-thing"], io.load_embedding(path)["zz-thing"])  # the bundle, for both


@pytest.mark.parametrize("fmt", formats.exportable(formats.EMBEDDING))
def test_every_embedding_format_written_reads_back(tmp_path, fmt):
    vectors = torch.randn(2, 32)
    path = io.save_embedding(tmp_path / f"zz-thing.{fmt}", vectors, step=3)
    assert torch.equal(io.load_embedding(path)["zz-thing"], vectors)


@pytest.mark.parametrize("fmt", formats.exportable(formats.HYPERNETWORK))
def test_every_hypernetwork_format_written_reads_back(tmp_path, fmt):
    hn = Hypernetwork([32])
    path = io.save_hypernetwork(tmp_path / f"style.{fmt}", hn)
    loaded, _ = io.load_hypernetwork(path)
    assert all(torch.equal(a, b) for a, b in zip(hn.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_image_embeddings_are_written_as_the_table_says(tmp_path):
    written = [f.suffix for f in formats.FORMATS if formats.EMBEDDING in f.writes and f.container == formats.IMAGE]
    assert written == [".png"]
    path = io.save_image_embedding(tmp_path / "zz-thing-3.png", Image.new("RGB", (64, 64)), torch.randn(1, 32))
    assert formats.is_image(path) and io.load_embedding(path)


def test_writers_refuse_what_the_table_does_not_write(tmp_path):
    with pytest.raises(ValueError, match="unknown embedding format"):
        io.save_embedding(tmp_path / "zz.ckpt", torch.randn(1, 32))
    with pytest.raises(ValueError, match="unknown hypernetwork format"):
        io.save_hypernetwork(tmp_path / "style.bin", Hypernetwork([32]))
    with pytest.raises(ValueError, match="unknown LoRA format"):
        io.save_lora(tmp_path / "style.pt", {})
    assert not list(tmp_path.iterdir())
