"""The GGTT entry translators: C, pure Python and numpy must agree, entry for entry."""
from __future__ import annotations

import array
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.hw import gtt
from nodes.mediator import translate as t
from nodes.mediator.translate import CACHE_INVALID, CACHE_MISS, MAX_MFN, get_translator

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("c", "python", "numpy")
U64 = np.uint64
FLAGS_LOW = 0x0FFE                                  # bits 11:1
FLAGS_HIGH = 0xFFFFFFFFFFFFFFFF & ~((1 << 46) - 1)  # bits 63:46


def entry(gfn: int, present: bool = True, flags: int = 0) -> int:
    return gtt.encode(gfn, gtt.PTE_PRESENT if present else 0) | flags


def run(name: str, guest: list[int] | np.ndarray, cache: list[int] | np.ndarray, scratch: int,
        slack: int = 0) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """Translate with `name`; returns (counts, out[:n], missing[:n_missing])."""
    g = np.asarray(guest, dtype=U64)
    c = np.asarray(cache, dtype=U64)
    # Poisoned outputs, so an entry an implementation forgets to write shows up.
    out = np.full(len(g) + slack, 0xDEAD, dtype=U64)
    missing = np.full(len(g) + slack, 0xBEEF, dtype=U64)
    counts = get_translator(name)(g, c, scratch, out, missing)
    assert out[len(g):].tolist() == [0xDEAD] * slack     # nothing written past len(guest)
    return counts, out[:len(g)], missing[:counts[3]]


# ---- all three agree -----------------------------------------------------------------------
def _entries(ncache: int) -> st.SearchStrategy[int]:
    gfn = st.one_of(st.integers(0, ncache + 3),                    # in range, and just past it
                    st.integers(0, (1 << 34) - 1))                 # anywhere in bits 45:12
    return st.builds(
        lambda g, present, low, high: (g << 12) | (int(present) * gtt.PTE_PRESENT)
        | (low & FLAGS_LOW) | (high & FLAGS_HIGH),
        gfn, st.booleans(), st.integers(0, 0xFFF), st.integers(0, (1 << 64) - 1))


_cache_value = st.one_of(st.just(CACHE_MISS), st.just(CACHE_INVALID),
                         st.integers(1, (1 << 34) - 1),            # a sane mfn
                         st.integers(1, (1 << 64) - 2))            # garbage: masked to bits 45:12


@st.composite
def _cases(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    cache = draw(st.lists(_cache_value, min_size=0, max_size=40))
    guest = draw(st.lists(_entries(len(cache)), min_size=0, max_size=60))
    scratch = draw(st.integers(0, MAX_MFN))
    return guest, cache, scratch


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases(), st.integers(0, 3))
def test_implementations_agree(case: tuple[list[int], list[int], int], slack: int) -> None:
    guest, cache, scratch = case
    ref_counts, ref_out, ref_missing = run("python", guest, cache, scratch, slack)
    assert sum(ref_counts) == len(guest)
    for name in ("c", "numpy"):
        counts, out, missing = run(name, guest, cache, scratch, slack)
        assert counts == ref_counts, name
        assert out.tolist() == ref_out.tolist(), name
        assert missing.tolist() == ref_missing.tolist(), name


@settings(max_examples=50, deadline=None)
@given(_cases())
def test_in_place_matches_separate_out(case: tuple[list[int], list[int], int]) -> None:
    guest, cache, scratch = case
    ref_counts, ref_out, _ = run("python", guest, cache, scratch)
    for name in IMPLS:
        g = np.array(guest, dtype=U64)
        counts = get_translator(name)(g, np.array(cache, dtype=U64), scratch, g,
                                      np.zeros(len(g), dtype=U64))
        assert counts == ref_counts and g.tolist() == ref_out.tolist(), name


# ---- one rule at a time ----------------------------------------------------------------------
CACHE = [CACHE_MISS, 0x1234, CACHE_INVALID, 0x55]   # gfn 0 unpinned, 2 failed, 1 and 3 pinned
SCRATCH = 0x777


@pytest.mark.parametrize("name", IMPLS)
def test_not_present_is_the_scratch_frame_alone(name: str) -> None:
    """Rule 10: the kernel builds the host entry of a not-present guest entry from zero (set_pfn
    scratch, clear_present): no guest flag bits, nothing in bits 63:46."""
    flags = gtt.PTE_RW | 0x0F0 | (0x3 << 62)
    counts, out, _ = run(name, [entry(1, present=False, flags=flags)], CACHE, SCRATCH)
    assert counts == (0, 0, 1, 0)
    assert int(out[0]) == SCRATCH << 12


@pytest.mark.parametrize("name", IMPLS)
def test_not_present_never_counts_as_miss(name: str) -> None:
    counts, out, _ = run(name, [entry(0, present=False)], CACHE, SCRATCH)
    assert counts == (0, 0, 1, 0) and int(out[0]) == SCRATCH << 12


@pytest.mark.parametrize("name", IMPLS)
def test_invalid_gfn_points_at_scratch_and_stays_present(name: str) -> None:
    counts, out, _ = run(name, [entry(2, flags=gtt.PTE_RW)], CACHE, SCRATCH)
    assert counts == (0, 1, 0, 0)
    assert int(out[0]) == (SCRATCH << 12) | gtt.PTE_RW | gtt.PTE_PRESENT


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("gfn", [len(CACHE), len(CACHE) + 1, (1 << 34) - 1])
def test_out_of_range_gfn_points_at_scratch(name: str, gfn: int) -> None:
    counts, out, _ = run(name, [entry(gfn)], CACHE, SCRATCH)
    assert counts == (0, 1, 0, 0)
    assert int(out[0]) == (SCRATCH << 12) | gtt.PTE_PRESENT


@pytest.mark.parametrize("name", IMPLS)
def test_empty_cache_sends_every_present_entry_to_scratch(name: str) -> None:
    counts, out, _ = run(name, [entry(0), entry(5, present=False)], [], SCRATCH)
    assert counts == (0, 1, 1, 0)
    assert out.tolist() == [(SCRATCH << 12) | 1, SCRATCH << 12]


@pytest.mark.parametrize("name", IMPLS)
def test_miss_is_reported_and_zeroed(name: str) -> None:
    guest = [entry(0), entry(1), entry(0, flags=gtt.PTE_RW), entry(9)]
    cache = [CACHE_MISS, 0x1234, 0, 0, 0, 0, 0, 0, 0, CACHE_MISS]
    counts, out, missing = run(name, guest, cache, SCRATCH)
    assert counts == (1, 0, 0, 3)
    assert missing.tolist() == [0, 0, 9]              # in guest order, duplicates kept
    assert out.tolist() == [0, entry(0x1234), 0, 0]


@pytest.mark.parametrize("name", IMPLS)
def test_ok_replaces_address_and_keeps_every_flag(name: str) -> None:
    flags = FLAGS_LOW | FLAGS_HIGH
    counts, out, _ = run(name, [entry(1, flags=flags), entry(3)], CACHE, SCRATCH)
    assert counts == (2, 0, 0, 0)
    assert out.tolist() == [entry(0x1234, flags=flags), entry(0x55)]


@pytest.mark.parametrize("name", IMPLS)
def test_cached_mfn_is_masked_to_address_bits(name: str) -> None:
    # garbage above bit 33 of the mfn must not leak into the flag bits
    counts, out, _ = run(name, [entry(0)], [(0xABC << 34) | 0x42], SCRATCH)
    assert counts == (1, 0, 0, 0) and out.tolist() == [entry(0x42)]


@pytest.mark.parametrize("name", IMPLS)
def test_caller_retry_loop_resolves_misses(name: str) -> None:
    # What the mediator does: translate, pin the missing gfns, translate again.
    fn = get_translator(name)
    guest = np.array([entry(g) for g in (3, 1, 3, 2)], dtype=U64)
    cache = np.zeros(4, dtype=U64)
    out, missing = np.empty(4, dtype=U64), np.empty(4, dtype=U64)
    assert fn(guest, cache, SCRATCH, out, missing) == (0, 0, 0, 4)
    for gfn in np.unique(missing[:4]):
        cache[gfn] = CACHE_INVALID if gfn == 2 else 0x100 + gfn
    assert fn(guest, cache, SCRATCH, out, missing) == (3, 1, 0, 0)
    assert out.tolist() == [entry(0x103), entry(0x101), entry(0x103), (SCRATCH << 12) | 1]


@pytest.mark.parametrize("name", IMPLS)
def test_accepts_any_8_byte_buffer(name: str) -> None:
    fn = get_translator(name)
    guest = np.array([entry(1), entry(3, present=False)], dtype=U64)
    cache = np.array(CACHE, dtype=U64)
    out, missing = array.array("Q", [0, 0]), memoryview(bytearray(16)).cast("Q")
    counts = fn(memoryview(guest.tobytes()).cast("Q"), cache.astype(np.int64), SCRATCH, out,
                missing)
    assert counts == (1, 0, 1, 0)
    assert out.tolist() == [entry(0x1234), SCRATCH << 12]
    # 2-D arrays are read as their flat, C-ordered words
    out2 = np.zeros((1, 2), dtype=U64)
    assert fn(guest.reshape(1, 2), cache, SCRATCH, out2, np.zeros(2, dtype=U64)) == counts


# ---- bad input: a clear exception, never a crash ---------------------------------------------
def _good() -> dict[str, object]:
    return {"guest": np.array([entry(1), entry(2)], dtype=U64),
            "cache": np.array(CACHE, dtype=U64),
            "scratch_mfn": SCRATCH,
            "out": np.zeros(2, dtype=U64),
            "missing": np.zeros(2, dtype=U64)}


def _readonly(n: int) -> np.ndarray:
    a = np.zeros(n, dtype=U64)
    a.flags.writeable = False
    return a


def _shared_with_guest(args: dict[str, object]) -> np.ndarray:
    buf = np.zeros(4, dtype=U64)
    buf[:2] = args["guest"]
    args["guest"] = buf[:2]
    return buf[1:3]


BAD = [
    # (argument, replacement or function of the good args, exception, words in the message)
    ("guest", np.zeros(2, dtype=np.uint32), ValueError, "itemsize"),
    ("cache", np.zeros(4, dtype=np.uint8), ValueError, "itemsize"),
    ("out", np.zeros(2, dtype=np.int32), ValueError, "itemsize"),
    ("missing", np.zeros(2, dtype=np.float32), ValueError, "itemsize"),
    ("out", np.zeros(1, dtype=U64), ValueError, "len(guest)"),
    ("missing", np.zeros(0, dtype=U64), ValueError, "len(guest)"),
    ("out", _readonly(2), ValueError, "read-only"),
    ("missing", _readonly(2), ValueError, "read-only"),
    ("out", memoryview(bytes(16)).cast("Q"), ValueError, "read-only"),
    ("out", bytearray(16), ValueError, "itemsize"),
    ("guest", np.zeros(4, dtype=U64)[::2], ValueError, "contiguous"),
    ("out", np.zeros(4, dtype=U64)[::2], ValueError, "contiguous"),
    ("guest", [1, 2], TypeError, "buffer"),
    ("cache", None, TypeError, "buffer"),
    ("out", "abcdefgh" * 2, TypeError, "buffer"),
    ("scratch_mfn", -1, ValueError, "0.."),
    ("scratch_mfn", MAX_MFN + 1, ValueError, "0.."),
    ("scratch_mfn", 1 << 80, ValueError, "0.."),
    ("scratch_mfn", 1.0, TypeError, "int"),
    ("scratch_mfn", "1", TypeError, "int"),
    ("out", lambda a: _shared_with_guest(a), ValueError, "overlaps"),
    ("out", lambda a: a["cache"][1:3], ValueError, "overlaps"),
    ("missing", lambda a: a["out"], ValueError, "overlaps"),
    ("missing", lambda a: a["guest"], ValueError, "overlaps"),
]


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("arg,bad,exc,words", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises(name: str, arg: str, bad: object, exc: type, words: str) -> None:
    args = _good()
    args[arg] = bad(args) if callable(bad) else bad
    with pytest.raises(exc) as info:
        get_translator(name)(*args.values())
    message = str(info.value)
    assert message.startswith(arg + ":") and words in message, message


@pytest.mark.parametrize("nargs", [0, 4, 6])
def test_c_wrong_argument_count(nargs: int) -> None:
    with pytest.raises(TypeError, match="5 arguments"):
        get_translator("c")(*([np.zeros(1, dtype=U64)] * nargs))


def test_c_survives_a_burst_of_bad_calls() -> None:
    fn = get_translator("c")
    for _ in range(200):
        for arg, bad, exc, _words in BAD:
            args = _good()
            args[arg] = bad(args) if callable(bad) else bad
            with pytest.raises(exc):
                fn(*args.values())


@pytest.mark.parametrize("failure", ["itemsize", "short", "overlap", "ok"])
def test_c_releases_buffers_on_every_path(failure: str) -> None:
    # An array.array cannot grow while a buffer export is live, so an export leaked by an error
    # path (or by the success path) shows up as BufferError here.
    guest, cache, out = array.array("Q", [1, 3]), array.array("Q", [0] * 4), array.array("Q", [0, 0])
    missing = {"itemsize": array.array("I", [0] * 4), "short": array.array("Q", [0]),
               "overlap": out, "ok": array.array("Q", [0, 0])}[failure]
    if failure == "ok":
        assert get_translator("c")(guest, cache, 0, out, missing) == (0, 0, 0, 2)   # gfn 0 unpinned
    else:
        with pytest.raises(ValueError):
            get_translator("c")(guest, cache, 0, out, missing)
    for buf in (guest, cache, out, missing):
        buf.append(0)


def test_scratch_mfn_limits_are_accepted() -> None:
    for name in IMPLS:
        for scratch in (0, MAX_MFN, np.uint64(MAX_MFN), True):
            counts, out, _ = run(name, [entry(0, present=False)], [], scratch)
            assert int(out[0]) == int(scratch) << 12


def test_empty_guest() -> None:
    for name in IMPLS:
        fn = get_translator(name)
        empty = np.zeros(0, dtype=U64)
        assert fn(empty, empty, 0, empty, empty) == (0, 0, 0, 0)


# ---- selection and build ---------------------------------------------------------------------
def test_c_extension_is_built() -> None:
    from nodes.mediator import _ctranslate                # fails if `pip install -e .` did not build it

    assert _ctranslate.CACHE_MISS == CACHE_MISS
    assert _ctranslate.CACHE_INVALID == CACHE_INVALID
    assert _ctranslate.PTE_ADDR_MASK == gtt.ADDR_MASK
    assert get_translator("c") is _ctranslate.translate_entries


def _translator_in_subprocess(pure: str | None) -> str:
    env = dict(os.environ)
    env.pop("GVTBENCH_PURE", None)
    if pure is not None:
        env["GVTBENCH_PURE"] = pure
    proc = subprocess.run(
        [sys.executable, "-c", "import nodes.mediator.translate as t; print(t.TRANSLATOR)"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip()


def test_gvtbench_pure_selects_python() -> None:
    assert _translator_in_subprocess("1") == "python"


def test_default_selects_c() -> None:
    assert _translator_in_subprocess(None) == "c"
    assert _translator_in_subprocess("0") == "c"


def test_module_selection_is_consistent() -> None:
    expected = {"c": get_translator("c"), "python": t.translate_entries_python}
    assert t.TRANSLATOR in expected
    assert t.translate_entries is expected[t.TRANSLATOR]


def test_get_translator_names() -> None:
    assert get_translator("python") is t.translate_entries_python
    assert get_translator("numpy") is t.translate_entries_numpy
    with pytest.raises(ValueError, match="'cuda'"):
        get_translator("cuda")


def test_get_translator_c_when_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(t, "translate_entries_c", None)
    with pytest.raises(RuntimeError, match="pip install -e"):
        get_translator("c")


# ---- the benchmark ---------------------------------------------------------------------------
def test_benchmark_smoke() -> None:
    from bench.perf_translate import format_translate, run_translate

    result = run_translate(entries=3000, repeats=2, seed=3)
    for key in ("entries", "repeats", "c_s", "numpy_s", "python_s", "c_vs_python", "c_vs_numpy",
                "numpy_vs_python", "python_entries_timed", "c_entries_per_s"):
        assert key in result, key
    assert result["entries"] == result["python_entries_timed"] == 3000
    text = format_translate(result)
    assert "3,000 entries" in text and "c vs python" in text


def test_benchmark_without_c(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.perf_translate import run_translate

    monkeypatch.setattr(t, "translate_entries_c", None)
    with pytest.raises(RuntimeError, match="pip install -e ."):
        run_translate(entries=10, repeats=1)
