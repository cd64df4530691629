"""Property-based fuzzing of every file reader: any bytes, and valid files truncated, bit-flipped or with
lying sizes, give a result or one UserError, never another exception, and never a memory failure.

The fuzz runs in a subprocess capped with RLIMIT_AS (pytest itself stays uncapped); the child reports a
failing example's traceback and its peak RSS, which must stay under 1.5 GB."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["pt", "bin", "safetensors", "png", "hn_pt", "hn_safetensors", "lora", "lora_bundle"]
PEAK_RSS = 1.5e9


def _seeds(folder: Path) -> dict[str, tuple[Path, bytes, object]]:
    """One valid file per reader: `{kind: (path to fuzz into, valid bytes, reader)}`."""
    import torch
    from PIL import Image

    from lit_ti import io
    from lit_ti.io.loras import LoraModule
    from lit_ti.modules.hypernetwork import Hypernetwork

    vectors = torch.randn(2, 16)
    out = {}
    for kind in ("pt", "bin", "safetensors"):
        path = io.save_embedding(folder / f"seed.{kind}", vectors, step=5)
        out[kind] = (folder / f"fuzz.{kind}", path.read_bytes(), io.read_embedding)
    png = io.save_image_embedding(folder / "seed.png", Image.new("RGB", (32, 32), (40, 90, 200)), vectors)
    out["png"] = (folder / "fuzz.png", png.read_bytes(), io.read_embedding)
    hn = Hypernetwork([16, 24], layer_structure=[1, 2, 1])
    for suffix in ("pt", "safetensors"):
        path = io.save_hypernetwork(folder / f"seedhn.{suffix}", hn, step=3)
        out[f"hn_{suffix}"] = (folder / f"fuzzhn.{suffix}", path.read_bytes(), io.load_hypernetwork)
    module = LoraModule(torch.randn(2, 16), torch.randn(24, 2), torch.tensor(2.0))
    path = io.save_lora(folder / "seed-lora.safetensors", {"lora_unet_a_to_q": module}, {"seed": vectors})
    out["lora"] = (folder / "fuzz-lora.safetensors", path.read_bytes(), io.read_lora)
    out["lora_bundle"] = (folder / "fuzz-bundle.safetensors", path.read_bytes(), io.read_embedding)  # generate's scan
    return out


def _strategy(seed: bytes):
    from hypothesis import strategies as st

    def flip(bits):
        raw = bytearray(seed)
        for at, bit in bits:
            raw[at % len(raw)] ^= 1 << bit
        return bytes(raw)

    def lie(args):  # a huge little-endian number over whatever size field is there
        at, value, width = args
        at %= len(seed)
        return seed[:at] + (value % 2 ** (8 * width)).to_bytes(width, "little") + seed[at + width :]

    def lie_text(args):  # a JSON/ASCII size (safetensors header, PNG text) replaced by a huge one
        index, number = args
        runs = list(re.finditer(rb"\d+", seed[:8192]))
        if not runs:
            return seed
        m = runs[index % len(runs)]
        return seed[: m.start()] + str(number).encode() + seed[m.end() :]

    huge = st.sampled_from([2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 10**9, 10**12])
    return st.one_of(
        st.binary(max_size=4096),
        st.integers(0, len(seed)).map(lambda n: seed[:n]),
        st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 7)), min_size=1, max_size=8).map(flip),
        st.tuples(st.integers(0, len(seed) - 1), huge, st.sampled_from([2, 4, 8])).map(lie),
        st.tuples(st.integers(0, 200), huge).map(lie_text),
    )


def _property(path: Path, seed: bytes, reader, examples: int, derandomize: bool = False):
    """The property for one reader: a result or one UserError naming the file, never a memory failure."""
    from hypothesis import HealthCheck, given, settings

    from lit_ti.errors import UserError

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )
    @given(_strategy(seed))
    def prop(raw: bytes) -> None:
        path.write_bytes(raw)
        try:
            reader(path)
        except UserError as e:
            text = str(e)
            assert str(path) in text, text
            assert "\n" not in text and not re.search(r"alloc|out of memory|MemoryError", text), text

    return prop


def _peak_rss() -> int:
    """This process's own peak resident set in bytes. Not ru_maxrss: Linux carries the parent's high-water mark
    into a child across fork and exec, so a child of a 2 GB pytest reports 2 GB before it reads a byte."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def worker(kinds: list[str], examples: int, folder: str, limit: int, derandomize: bool = False) -> None:
    """The capped child: fuzz each reader, print one JSON line `{kind: traceback or null, "rss": peak,
    "rss_after": {kind: peak so far}}` (which reader raised the peak)."""
    import resource
    import traceback
    import warnings

    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report, after = {}, {}
    for kind, (path, seed, reader) in _seeds(Path(folder)).items():
        if kind not in kinds:
            continue
        try:
            _property(path, seed, reader, examples, derandomize)()
            report[kind] = None
        except BaseException:
            report[kind] = traceback.format_exc()[-3000:]
        after[kind] = _peak_rss()
    report["rss_after"] = after
    report["rss"] = _peak_rss()
    print(json.dumps(report))


def run_fuzz(tmp_path: Path, kinds: list[str], examples: int, derandomize: bool = False) -> dict:
    # address space: what torch and friends map at start-up (~2-3 GB of mostly untouched virtual memory)
    # plus 1.5 GB; a reader that tried to allocate gigabytes fails inside the child and shows in its report
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, lit_ti.io, hypothesis;"
        "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024;"
        f"from tests.test_fuzz_readers import worker; worker({kinds!r}, {examples}, {str(tmp_path)!r}, vm + int(1.5e9), {derandomize})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(report: dict, kinds: list[str]) -> None:
    failures = {k: report[k] for k in kinds if report[k]}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert report["rss"] < PEAK_RSS, f"peak RSS {report['rss'] / 1e9:.2f} GB; after each reader: {report['rss_after']}"


def test_every_reader_survives_fuzzing(tmp_path):
    """~30 s: 40 examples per reader (any bytes, truncations, bit flips, lying sizes), the same examples on every
    run (CI must not depend on luck); the slow lane draws fresh ones."""
    report = run_fuzz(tmp_path, KINDS, 40, derandomize=True)
    check(report, KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_survives_long_fuzzing(tmp_path, kind):
    check(run_fuzz(tmp_path, [kind], 1500), [kind])


@pytest.mark.slow
def test_hostile_files_stay_small_in_memory(big_hostile):
    """Peak RSS of a fresh process reading each hostile file (all <= 10 MB) stays under 1.5 GB."""
    peaks = {}
    for kind, path in {"(import only)": None, **big_hostile}.items():
        reader = "load_hypernetwork" if kind.startswith("hn") else "read_embedding"
        call = f"lit_ti.io.{reader}({str(path)!r})" if path else "None"
        code = (
            f"import sys, lit_ti.io; from lit_ti.errors import UserError\n"
            f"try:\n    {call}\nexcept UserError:\n    pass\n"
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)  # see _peak_rss"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[kind] = (path.stat().st_size if path else 0, int(proc.stdout.split()[-1]))
    print("\n".join(f"{k:16s} file {s / 1e6:8.2f} MB   peak RSS {r / 1e6:8.1f} MB" for k, (s, r) in peaks.items()))
    assert all(s <= 10e6 and r < PEAK_RSS for s, r in peaks.values()), peaks
