"""A data folder that cannot hurt, through `python train.py` (the `entry` fixture checks the trust rules):
special files are skipped unopened, multi-frame images train on their first frame, captions in any Unicode
encoding are read, subfolders are named, user text in messages is escaped and bounded, and settings that
size allocations are bounded up front."""

import os
import signal
from pathlib import Path

import pytest
from PIL import Image

FAST = ["trainer.max_steps=1", "callbacks.toy_eval=null", "callbacks.preview=null", "callbacks.model_checkpoint=null"]
CONCEPT = ["data=concept", "name=zz-concept", "data.bucket_step=16", *FAST]


def folder(root: Path, sizes=((64, 64), (48, 80), (80, 48))) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (60 * i, 120, 200 - 50 * i)).save(data / f"{i:02d}.png")
    return data


@pytest.fixture
def no_hang():
    """A hang (e.g. a FIFO opened for reading) fails the test instead of blocking the suite."""

    def fail(*_):
        raise TimeoutError("the run hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def about_data(outcome) -> list[str]:
    return [w for w in outcome.warnings if "data." in w]


def test_special_files_are_skipped_unopened(entry, no_hang):
    data = folder(entry.root)
    os.mkfifo(data / "pipe.png")
    os.mkfifo(data / "pipe.txt")  # a FIFO where a caption would be: not read either
    outcome = entry.train(f"data.dir={data}", *CONCEPT)
    assert outcome.code == 0, outcome.errors
    warned = about_data(outcome)
    assert len(warned) == 1 and "pipe.png (a FIFO; not opened)" in warned[0], outcome.warnings


def test_an_animated_image_trains_on_its_first_frame(entry):
    data = folder(entry.root)
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(data / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    outcome = entry.train(f"data.dir={data}", *CONCEPT)
    assert outcome.code == 0, outcome.errors
    warned = about_data(outcome)
    assert len(warned) == 1 and "first frame of anim.gif (3 frames)" in warned[0], warned


def test_captions_in_any_unicode_encoding_train(entry):
    data = folder(entry.root)
    for i, encoding in enumerate(["utf-8-sig", "utf-16", "utf-16-le"]):  # BOM, BOM, none
        (data / f"{i:02d}.txt").write_text("café, crème brûlée", encoding=encoding)
    outcome = entry.train(f"data.dir={data}", "data.template=subject_filewords", *CONCEPT)
    assert outcome.code == 0 and not about_data(outcome), (outcome.errors, outcome.warnings)


def test_subfolders_are_named_not_searched(entry):
    data = folder(entry.root)
    (data / "more").mkdir()
    Image.new("RGB", (64, 64)).save(data / "more" / "x.png")
    outcome = entry.train(f"data.dir={data}", *CONCEPT)
    assert outcome.code == 0, outcome.errors
    warned = about_data(outcome)
    assert len(warned) == 1 and "1 subfolder(s) not searched: more" in warned[0], warned


def test_file_names_in_messages_are_escaped_and_bounded(entry):
    data = folder(entry.root)
    (data / "!evil\x1b[2J\rname.png").write_bytes(b"not an image")
    for i in range(30):
        (data / f"{i:03d}{'x' * 200}.jpg").write_bytes(b"not a jpeg")
    outcome = entry.train(f"data.dir={data}", *CONCEPT)
    assert outcome.code == 0, outcome.errors
    warned = about_data(outcome)
    assert len(warned) == 1 and "evil\\x1b[2J\\rname.png" in warned[0], warned
    assert "\x1b" not in outcome.stderr + warned[0] and "\r" not in warned[0]
    assert len(warned[0]) < 2000 and "and 21 more" in warned[0]  # 31 skipped, 10 named


def test_the_latent_cache_makes_a_second_run_reuse_it(entry):
    data = folder(entry.root)
    cache = entry.out / "latent-cache"  # inside the run folder: the trust rules allow writes only there
    first = entry.train(f"data.dir={data}", f"data.cache_dir={cache}", *CONCEPT)
    files = {p: p.read_bytes() for p in cache.rglob("*.safetensors")}
    assert first.code == 0 and len(files) == 3
    for p in [*entry.out.glob("zz-concept.*"), *entry.out.glob("checkpoints/*")]:  # a fresh run may not overwrite
        p.unlink()
    second = entry.train(f"data.dir={data}", f"data.cache_dir={cache}", *CONCEPT)
    assert second.code == 0 and {p: p.read_bytes() for p in cache.rglob("*.safetensors")} == files


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.repeats=1000000", "data.repeats=1000000"),
        ("data.resolution=100000", "data.resolution=100000"),
        ("data.batch_size=100000", "data.batch_size=100000"),
        ("data.bucket_max_side=100000", "data.bucket_max_side=100000"),
        ("data.bucket_step=12", "data.bucket_step=12"),
        ("data.bucket_min_side=1024", "data.bucket_min_side=1024"),
        ("data.keep_tokens=-1", "data.keep_tokens=-1"),
        ("data.num_workers=100000", "data.num_workers=100000"),
    ],
)
def test_allocation_sizes_are_bounded_up_front(entry, override, key):
    data = folder(entry.root)
    outcome = entry.train(f"data.dir={data}", *CONCEPT, override)
    assert outcome.code == 2 and len(outcome.errors) == 1, (outcome.code, outcome.errors)
    assert key in outcome.errors[0], outcome.errors[0]
    assert not list(outcome.out.glob("*.safetensors"))
