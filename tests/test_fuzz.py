"""Fuzz pass (hypothesis): image decoding, config parsing and checkpoint loading on random and
mutated input. The only allowed outcomes are a result or the project's own error types
(``ImageReadError``, ``ConfigError``, ``CheckpointError``); nothing else escapes, no code runs,
no file is written.

The default run takes a few examples per property (fast, deterministic); the ``slow`` profile
takes many: ``HYPOTHESIS_PROFILE=slow pytest tests/test_fuzz.py`` (or ``make fuzz``).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import traceback
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.checkpoint import (  # noqa: E402
    CONFIG_KEY,
    CheckpointError,
    CheckpointMismatchError,
    load_pretrained,
    read_pretrained_config,
    read_state_dict,
    save_pretrained,
)
from ldm.config import ConfigError, instantiate, load_config, validate_untrusted  # noqa: E402
from ldm.data.image_io import ImageReadError, read_image  # noqa: E402
from ldm.registry import REGISTRY  # noqa: E402
from moe_sr.build import load_pipeline_config  # noqa: E402
from moe_sr.checkpoints import read_expert_metadata  # noqa: E402

PROBE = "moe_sr_fuzz_probe"

# Imported once here, not in every forked example (a child's imports die with it).
Image.init()  # every Pillow format plugin
REGISTRY.load_plugins()  # every module that registers config targets
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchvision.io  # noqa: E402, F401  (the 16-bit PNG decoder)


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A module whose import or call leaves a marker file: payloads name it."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / f"{PROBE}.py").write_text(
        f"open({str(folder / 'IMPORTED')!r}, 'w').close()\n"
        f"def run(*a, **k):\n    open({str(folder / 'RAN')!r}, 'w').close()\n"
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(PROBE, None)


def _nothing_ran(probe: Path) -> None:
    assert not (probe / "IMPORTED").exists() and not (probe / "RAN").exists()
    assert PROBE not in sys.modules


def isolated(test: Callable) -> Callable:
    """Run a property's body in a forked child, so that a native decoder that crashes the
    process (segmentation fault) fails the example instead of killing the test run. Goes
    below ``@given`` (hypothesis generates in the parent and shrinks on the child's verdict)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, report, exit without running any cleanup of the parent
            os.close(read_end)
            code = 0
            try:
                test(*args, **kwargs)
            except BaseException:  # noqa: BLE001 - reported to the parent
                os.write(write_end, traceback.format_exc()[-6000:].encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            report = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            raise AssertionError(f"the process crashed (signal {os.WTERMSIG(status)})")
        assert os.WEXITSTATUS(status) == 0, report

    return wrapper


def _outcome(fn: Callable, *errors: type[BaseException]):
    """``fn()``, or the project error it raised (returned, checked to be one line)."""
    try:
        return fn()
    except errors as err:
        if not isinstance(err, CheckpointMismatchError):  # that one lists keys, one per line
            assert len(str(err).strip().splitlines()) == 1, str(err)
        assert str(err).strip(), type(err)
        return err


def _in_empty_folder(name: str, data: bytes, fn: Callable[[Path], object]):
    """Write ``data`` to ``name`` in a fresh folder, run ``fn(path)``; the folder must hold
    only that file afterwards (nothing written next to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        result = fn(path)
        assert os.listdir(tmp) == [name]
    return result


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with bytes overwritten at (relative) positions, optionally truncated."""
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    if cut is not None and buf:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=8)
CUTS = st.one_of(st.none(), st.integers(0, 2**31))


# --------------------------------------------------------------------------- images


def _encoded(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"],
}
VALID_IMAGES = st.sampled_from(sorted(FORMAT_MODES)).flatmap(
    lambda fmt: st.tuples(
        st.just(fmt),
        st.sampled_from(FORMAT_MODES[fmt]),
        st.tuples(st.integers(1, 24), st.integers(1, 24)),
        st.integers(0, 2**16),
    )
)


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpha dropped, decompression-bomb size warnings
        return _outcome(lambda: read_image(path), ImageReadError)


def _check_image(result, size: tuple[int, int] | None = None) -> None:
    if isinstance(result, ImageReadError):
        return
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    assert result.ndim == 3 and result.shape[0] == 3
    assert (
        bool(torch.isfinite(result).all())
        and 0.0 <= float(result.min()) <= float(result.max()) <= 1.0
    )
    if size is not None:
        assert tuple(result.shape[1:]) == (size[1], size[0])


@given(spec=VALID_IMAGES)
@isolated
def test_valid_images_of_every_mode_and_size_decode(spec):
    fmt, mode, size, seed = spec
    result = _in_empty_folder(f"x.{fmt.lower()}", _encoded(fmt, mode, size, seed), _read)
    assert not isinstance(result, ImageReadError), f"{fmt} {mode} {size}: {result}"
    _check_image(result, size)


@given(spec=VALID_IMAGES, edits=EDITS, cut=CUTS)
@isolated
def test_mutated_and_truncated_images_give_a_tensor_or_image_read_error(spec, edits, cut):
    fmt, mode, size, seed = spec
    data = _mutate(_encoded(fmt, mode, size, seed), edits, cut)
    _check_image(_in_empty_folder(f"x.{fmt.lower()}", data, _read))


@given(data=st.binary(max_size=512), name=st.sampled_from(["x.png", "x.jpg", "x.tif", "x"]))
@isolated
def test_random_bytes_give_image_read_error(data, name):
    _check_image(_in_empty_folder(name, data, _read))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16(width: int, height: int, color: int, interlace: int, seed: int) -> list[list[bytes]]:
    """The chunks ``[type, body]`` of a valid 16-bit PNG (Pillow writes 16-bit gray only)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 65536, (height, width * channels), dtype=np.uint16).astype(">u2")
    if interlace:  # Adam7: the passes' rows one after the other (filter 0 each)
        rows = []
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                               (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):  # fmt: skip
            sub = pixels.reshape(height, width, channels)[y0::dy, x0::dx]
            if sub.size:
                rows += [b"\x00" + r.tobytes() for r in sub.reshape(sub.shape[0], -1)]
        raw = b"".join(rows)
    else:
        raw = b"".join(b"\x00" + r.tobytes() for r in pixels)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, interlace)
    return [[b"IHDR", ihdr], [b"IDAT", zlib.compress(raw)], [b"IEND", b""]]


def _join(chunks: list[list[bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(k, b) for k, b in chunks)


PNG16 = st.tuples(
    st.integers(1, 12), st.integers(1, 12), st.sampled_from([0, 2, 4, 6]), st.integers(0, 1),
    st.integers(0, 2**16),
)  # fmt: skip
CHUNK_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["byte", "type", "cut", "insert", "pixels"]),
        st.integers(0, 2**31),
        st.integers(0, 255),
        st.sampled_from(
            [
                b"tRNS",
                b"sBIT",
                b"gAMA",
                b"PLTE",
                b"iCCP",
                b"zTXt",
                b"IDAT",
                b"IEND",
                b"IHDR",
                b"abcd",
                b"ABCD",
            ]
        ),  # fmt: skip
    ),
    max_size=4,
)


def _check_png16_bytes(data: bytes) -> None:
    result = _in_empty_folder("x.png", data, _read)
    _check_image(result)
    if isinstance(result, ImageReadError):
        assert ".cpp" not in str(result) and "Exception raised from" not in str(result)


@given(spec=PNG16, edits=CHUNK_EDITS, raw_edits=EDITS, cut=CUTS)
@isolated
def test_mutated_16bit_pngs_never_crash_and_name_no_source_files(spec, edits, raw_edits, cut):
    """Issue: a truncated 16-bit PNG's message leaked a C++ source path; the fuzz pass then
    found files that crash torchvision's decoder (segmentation fault)."""
    chunks = _png16(*spec)
    for op, pos, value, kind in edits:  # structural edits with valid CRCs: reach the decoder
        c = chunks[pos % len(chunks)]
        if op == "byte" and c[1]:
            body = bytearray(c[1])
            body[pos % len(body)] = value
            c[1] = bytes(body)
        elif op == "type":
            c[0] = kind
        elif op == "cut":
            c[1] = c[1][: pos % (len(c[1]) + 1)]
        elif op == "insert":
            chunks.insert(1 + pos % len(chunks), [kind, bytes([value]) * (pos % 40)])
        elif op == "pixels" and c[0] == b"IDAT":
            try:
                raw = bytearray(zlib.decompress(c[1]))
            except zlib.error:
                continue
            if raw:
                raw[pos % len(raw)] = value
            c[1] = zlib.compress(bytes(raw))
    _check_png16_bytes(_mutate(_join(chunks), raw_edits, cut))


CRASHING_PNG16 = bytes.fromhex(  # truncated 16-bit PNG that crashed torchvision 0.29's decode_png
    "89504e470d0a1a0a0000000d4948445200000008000000081000000000b1f43d140000003449444154789c6364"
    "60607ec1020419e51d695eb0bc4012841cb02066a1422fe0c20a0eba66b0c83bb038e03583f1d689140d2f0093"
    "5934e75ca4826a0000000049454e"
)


def test_a_png16_that_crashed_the_decoder_is_an_image_read_error():
    @isolated
    def check() -> None:
        result = _in_empty_folder("x.png", CRASHING_PNG16, _read)
        assert isinstance(result, ImageReadError), result
        assert "cannot decode 16-bit PNG: corrupt (CRC error in chunk 'IDAT')" in str(result)

    check()


# --------------------------------------------------------------------------- configs


KEYS = st.sampled_from(
    ["unet", "vae", "stages", "sampler", "sampler.steps", "sampler.eta", "sampler.seed",
     "tiling", "tiling.mode", "tiling.latent_tile", "tiling.vae_overlap", "color_fix",
     "ffn_moe_routing", "schedule.kind", "schedule.num_timesteps", "unet.target",
     "unet.params.model_channels", "vae.params", "extra", "a.b.c", "", " ", "x..y"]
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        ["on", "off", "yes", "no", "null", "~", "[1,", "{a: 1}", "[0, 500, 1000]", "1e9", "-1",
         "nan", ".inf", "${preset:moe_sr/sr8x_tiny}", "${preset:nope}", "${oc.env:HOME}",
         "${oc.decode:'[1,2]'}", "${missing.key}", "!!python/object/apply:os.system [true]",
         "${unet}", "'quoted'", "a: b: c", "\"", "%", "&anchor x", "*alias", "@x", "`x`"]
    ),
    st.text(max_size=20),
    st.integers().map(str),
    st.floats(allow_nan=True).map(str),
)  # fmt: skip
DOTLISTS = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=15)), max_size=4
)


@given(overrides=DOTLISTS)
@isolated
def test_pipeline_config_overrides_give_a_config_or_config_error(overrides, probe):
    result = _outcome(lambda: load_pipeline_config("moe_sr/sr8x_tiny", overrides), ConfigError)
    assert isinstance(result, (dict, ConfigError))
    _nothing_ran(probe)


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.builds(lambda k, v: f"{k.replace('.', '_') or 'k'}: {v}", KEYS, VALUES),
             max_size=6).map("\n".join),  # fmt: skip
    st.sampled_from(
        ["!!python/object/apply:os.system ['true']", "a: !!python/name:os.system", "[1, 2]",
         "include: nope", "a: ${preset:moe_sr/sr8x_tiny,unet}", "a:\n  - b\n - c", "\t\tx: 1",
         "a: &x [*x]", "a: {b: ${a}}", f"target: {PROBE}.run"]
    ),
)  # fmt: skip


@given(text=YAML_TEXT, overrides=DOTLISTS)
@isolated
def test_yaml_files_and_overrides_give_a_config_or_config_error(text, overrides, probe):
    def load(path: Path):
        return load_config(path, overrides=overrides)

    result = _in_empty_folder("c.yaml", text.encode("utf-8", "surrogatepass"),
                              lambda p: _outcome(lambda: load(p), ConfigError))  # fmt: skip
    assert not isinstance(result, BaseException) or isinstance(result, ConfigError)
    _nothing_ran(probe)


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12),
    st.sampled_from(["os.system", f"{PROBE}.run", "${oc.env:HOME}", "unet", "vq_model",
                     "fa_vae_vq_f4", "diffusion_sr", "sr_folder", "builtins.eval"]),
)  # fmt: skip
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["target", "params", "x", "ddconfig", "unet"]) | st.text(max_size=6),
            inner,
            max_size=4,
        ),  # fmt: skip
    ),
    max_leaves=12,
)
TARGETS = st.sampled_from(sorted(REGISTRY.names()) + ["os.system", f"{PROBE}.run", "a.b", ""])


@given(target=TARGETS, params=st.dictionaries(st.text(max_size=12), JSON, max_size=4))
@isolated
def test_untrusted_configs_are_validated_never_run(target, params, probe):
    cfg = {"target": target, "params": params}
    result = _outcome(
        lambda: validate_untrusted(cfg, source="f.safetensors", kinds=("autoencoder", "unet")),
        ConfigError,
    )
    if isinstance(result, dict):  # accepted: it must build on the meta device
        with torch.device("meta"):
            _outcome(lambda: instantiate(result, trusted=False, source="f"), ConfigError,
                     TypeError, ValueError)  # fmt: skip
    _nothing_ran(probe)


# --------------------------------------------------------------------------- checkpoints


@functools.cache
def _small_files() -> dict:
    """Bytes of a small model file of ours (config in the metadata) and of a zip pickle (a
    cache, not a fixture: hypothesis would print a fixture's megabytes with every failure)."""
    folder = Path(tempfile.mkdtemp(prefix="moesr_fuzz_"))
    cfg = {"target": "vq_model", "params": to_dict(load_config("autoencoder/vq_f4_tiny"))["params"]}
    torch.manual_seed(0)
    model = instantiate(cfg)
    st_path = save_pretrained(model, folder / "m.safetensors", cfg, metadata={"stage": 1})
    pt_path = folder / "m.ckpt"
    torch.save({"state_dict": {"w": torch.arange(6.0), "b": torch.zeros(2)}, "global_step": 3},
               pt_path)  # fmt: skip
    out = {"safetensors": st_path.read_bytes(), "zip": pt_path.read_bytes()}
    for p in (st_path, pt_path):
        p.unlink()
    folder.rmdir()
    return out


@pytest.fixture(scope="module", autouse=True)
def _files_made_in_the_parent():
    """Make the cached files once here: a forked example's cache dies with it."""
    _small_files()


def to_dict(cfg):
    from ldm.config import to_plain

    return to_plain(cfg)


def _header_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _load_all(path: Path) -> list:
    """Every loader of our safetensors files: results or our errors."""
    errors = (CheckpointError, ConfigError)
    return [
        _outcome(lambda: load_pretrained(path, kinds=("autoencoder",)), *errors),
        _outcome(lambda: read_pretrained_config(path), *errors),
        _outcome(lambda: read_expert_metadata(path), *errors),
        _outcome(lambda: read_state_dict(path), *errors),
    ]


@given(edits=EDITS, cut=CUTS, in_header=st.booleans())
@isolated
def test_mutated_safetensors_bytes(probe, edits, cut, in_header):
    data = _small_files()["safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    if in_header:  # aim the edits at the 8-byte length and the JSON header
        edits = [(pos % (8 + n), v) for pos, v in edits]
    _in_empty_folder("m.safetensors", _mutate(data, edits, cut), _load_all)
    _nothing_ran(probe)


@given(
    config=st.one_of(JSON, st.builds(lambda t, p: {"target": t, "params": p}, TARGETS, JSON)),
    stage=JSON,
    raw=st.one_of(st.none(), st.text(max_size=30)),
)
@isolated
def test_mutated_metadata(probe, config, stage, raw):
    """Stored configs, stage metadata and non-JSON strings: refused with a message naming the
    file, never built or imported unless valid."""
    header, body = _header_split(_small_files()["safetensors"])
    meta = dict(header["__metadata__"])
    meta[CONFIG_KEY] = raw if raw is not None else json.dumps(config)
    meta["stage"] = json.dumps(stage)
    header["__metadata__"] = meta
    for result in _in_empty_folder("m.safetensors", _with_header(header, body), _load_all):
        if isinstance(result, CheckpointError | ConfigError):
            assert "m.safetensors" in str(result)
    _nothing_ran(probe)


TENSOR_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""]),
        "shape": st.lists(st.integers(-2, 2**33), max_size=4),
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3),
    }
)


@given(entries=st.dictionaries(st.text(max_size=30), TENSOR_ENTRY, max_size=4))
@isolated
def test_mutated_tensor_tables(probe, entries):
    header, body = _header_split(_small_files()["safetensors"])
    for name, entry in entries.items():
        if name != "__metadata__":
            header[name] = entry
    _in_empty_folder("m.safetensors", _with_header(header, body), _load_all)
    _nothing_ran(probe)


class _Payload:
    def __reduce__(self):
        import importlib

        return (importlib.import_module, (PROBE,))


def _rezip(data: bytes, edits, cut, inject: bool) -> bytes:
    """The zip checkpoint with its pickle mutated (CRCs rewritten, so the pickle is read)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            payload = src.read(info)
            if info.filename.endswith("data.pkl"):
                if inject:  # a pickle that would import the probe, spliced in front
                    payload = pickle.dumps(_Payload(), protocol=2)[:-1] + payload[2:]
                payload = _mutate(payload, edits, cut)
            dst.writestr(info.filename, payload)
    return out.getvalue()


@given(edits=EDITS, cut=CUTS, inject=st.booleans(), whole=st.booleans())
@isolated
def test_mutated_zip_pickles(probe, edits, cut, inject, whole):
    data = _small_files()["zip"]
    data = _mutate(data, edits, cut) if whole else _rezip(data, edits, cut, inject)

    def load(path: Path):
        return _outcome(lambda: read_state_dict(path), CheckpointError)

    result = _in_empty_folder("m.ckpt", data, load)
    assert isinstance(result, (dict, CheckpointError))
    if isinstance(result, CheckpointError):
        assert "weights_only=False" not in str(result)
    _nothing_ran(probe)
