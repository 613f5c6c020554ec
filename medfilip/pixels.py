"""Decode, window and resize every image once into a memory-mappable uint8 store.

The ``pixels`` stage turns ``data/interim/images.parquet`` into

* shards ``pixels-00000.npy``, ``pixels-00001.npy``, … – ``(B, S, S)`` uint8 ``.npy`` files
  of ``B = pixels.shard_images`` rows each (the last one shorter), a few GB apiece, and beside
  each its index part ``pixels-0000k.parquet`` (written after the pixels: a shard is finished
  when both exist), and
* ``index.parquet`` – ``image_id, study_id, path, row, ok, error, orig_height,
  orig_width, shard, shard_row``, one row per input row in the same order.

Every reader goes through :class:`PixelStore`, whose ``array`` reads the shards as one
``(N, S, S)`` array, so the layout can change underneath. The build resumes: an interrupted
run loses only the shard it was writing. An image that cannot be read either stops the stage
(``on_error: fail``; finished shards are kept) or is recorded with ``ok=False`` and its error
and stored as zeros (``on_error: skip``); no row is ever dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.format import open_memmap
from PIL import Image, ImageOps
from tqdm import tqdm

from medfilip.config import PixelsParams
from medfilip.errors import UserError

PIXELS_FILE = "pixels.npy"  # the single-file store of earlier versions (still readable)
FINGERPRINT_SUFFIX = ".fingerprint"  # beside each shard: the digest of its files' sizes and mtimes
SHARD_PREFIX = "pixels-"  # pixels-00000.npy + pixels-00000.parquet (that shard's index part)
INDEX_FILE = "index.parquet"
# Fixed (not per-process) names so a killed run's leftovers are overwritten, not piled up.
PARTIAL_SUFFIX = ".partial"

# Robust window for >8-bit images that carry no window of their own. Raw radiographs put
# collimator edges, burned-in labels and dead/hot pixels at the extremes of the range;
# clipping the outer 0.5 % on each side ignores them and spreads the anatomy over 0..255.
DEFAULT_PERCENTILES = (0.5, 99.5)

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114])

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
_MAX_FAILURES_IN_SUMMARY = 100


class PixelError(UserError, RuntimeError):
    """An image that cannot be turned into pixels; the message names the file and what to do."""


# --------------------------------------------------------------------------- decoding


def load_image(path: Path, *, draft_size: Optional[int] = None) -> np.ndarray:
    """Decode one image file to a 2-D grayscale array (PNG/JPEG/TIFF, 8 or 16 bit, or DICOM).

    Returns uint8 when the source is 8-bit or a DICOM file carries its own display
    window (VOI LUT or Window Center/Width, already applied); otherwise the wider raw
    values (uint16/int32/float32) for :func:`to_uint8` to window. DICOM MONOCHROME1 is
    inverted so that more X-ray attenuation is always brighter. ``draft_size`` lets
    JPEG decode at a reduced scale that is still at least that many pixels per side.
    """
    return _decode(Path(path), draft_size)[0]


def _decode(path: Path, draft_size: Optional[int] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path``; return the grayscale array and the original (height, width)."""
    try:
        # One open per image: sniff the DICOM magic, then hand the same handle to the decoder.
        with open(path, "rb") as fh:
            has_magic = fh.read(132)[128:132] == b"DICM"
            fh.seek(0)
            if has_magic or path.suffix.lower() in _DICOM_SUFFIXES:
                img = _decode_dicom(fh, path, has_magic)
                return img, (int(img.shape[0]), int(img.shape[1]))
            return _decode_pil(fh, path, draft_size)
    except FileNotFoundError:
        raise PixelError(f"image file not found: {path}") from None
    except (PixelError, ImportError):
        # ImportError is an environment problem, not a bad image: never record it per image.
        raise
    except Exception as exc:  # PIL and pydicom raise many types for one problem: a bad file
        raise PixelError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def _decode_pil(
    fh: BinaryIO, path: Path, draft_size: Optional[int]
) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(fh) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1)  # EXIF orientation; 1 = as stored
        if draft_size is not None and im.format == "JPEG":
            # DCT-domain downscaling: decodes a 3000 px radiograph several times faster.
            im.draft("L", (2 * draft_size, 2 * draft_size))
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):  # 90-degree turns swap the axes
                width, height = height, width
        mode = im.mode
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            img = np.asarray(im)
            if not img.dtype.isnative:  # I;16B
                img = img.astype(img.dtype.newbyteorder("="))
        else:  # RGB, RGBA, LA, P, 1, CMYK, YCbCr: BT.601 luminance
            img = np.asarray(im.convert("L"))
    if img.ndim != 2:
        raise PixelError(f"{path}: expected a 2-D grayscale image, got shape {img.shape}")
    return img, (height, width)


class DicomDecoderMissing(UserError, ImportError):
    """A DICOM file needs a package that is not installed: an environment problem, never a per-image skip."""


# Compressed transfer syntaxes pydicom decodes only through a plugin -> what to pip install.
_JPEG_PLUGIN = "pylibjpeg pylibjpeg-libjpeg"
_J2K_PLUGIN = "pylibjpeg pylibjpeg-openjpeg"
_DICOM_PLUGINS = {
    "1.2.840.10008.1.2.4.50": _JPEG_PLUGIN,  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51": _JPEG_PLUGIN,  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": _JPEG_PLUGIN,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _JPEG_PLUGIN,  # JPEG Lossless SV1: the usual lossless CR/DX archive format
    "1.2.840.10008.1.2.4.80": _JPEG_PLUGIN,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG_PLUGIN,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _J2K_PLUGIN,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K_PLUGIN,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K_PLUGIN,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _J2K_PLUGIN,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _J2K_PLUGIN,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless: pydicom decodes it natively too
}


def _decode_dicom(fh: BinaryIO, path: Path, has_magic: bool) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:
        raise DicomDecoderMissing(
            f"{path} is a DICOM file and reading it needs pydicom: "
            "pip install 'medfilip[dicom]'"
        ) from exc
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    # force: a .dcm file without the 128-byte preamble (old ACR-NEMA style) is still DICOM.
    ds = pydicom.dcmread(fh, force=not has_magic)
    if "PixelData" not in ds:
        raise PixelError(f"{path}: DICOM file has no pixel data (not an image object?)")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise PixelError(
            f"{path}: multi-frame DICOM ({n_frames} frames) is not a single radiograph; "
            "export the frame you want as its own file"
        )
    _require_pixel_decoder(ds, path)
    arr = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:  # colour (pydicom returns RGB)
        lum = arr[..., :3] @ _LUMA
        return np.rint(lum).astype(np.uint8) if arr.dtype == np.uint8 else lum.astype(np.float32)

    arr = _stored_values(arr, ds)
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)  # Rescale Slope/Intercept
    invert = str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    unit = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        def voi(x: np.ndarray) -> np.ndarray:
            return np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), dtype=np.float64)

        n_entries, first_mapped = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        n_entries = n_entries or 65536  # 0 means 2**16 entries
        # Normalise by the LUT's own output range, not its descriptor's bit depth (often wrong).
        lut_out = voi(np.arange(first_mapped, first_mapped + n_entries, dtype=np.int64))
        lo, hi = float(lut_out.min()), float(lut_out.max())
        out = voi(np.rint(values).astype(np.int64))
        unit = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        # VOI LUT Function (0028,1056): LINEAR by default, or LINEAR_EXACT / SIGMOID (PS3.3 C.11.2.1.3).
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            function = "LINEAR"  # an unknown function name: the standard's default
        if width > 0 and not (function == "LINEAR" and width < 1):
            unit = window_unit(values, center, width, function)
    if unit is None:
        if arr.dtype == np.uint8 and int(getattr(ds, "BitsStored", 8)) == 8 and np.array_equal(values, arr):
            # 8 full bits, no rescale, no window (SIIM's JPEGs): display-ready, like an 8-bit PNG.
            return 255 - arr if invert else arr
        # No usable display window: keep the raw values for the percentile window.
        if invert:
            values = values.max() + values.min() - values
        return values.astype(np.float32)
    u8 = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - u8 if invert else u8


def _require_pixel_decoder(ds: Any, path: Path) -> None:
    """Fail with an install hint when the file's compression needs a pydicom plugin that is missing."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is None:
        return  # read without a file meta header: implicit little endian, never compressed
    syntax = UID(str(syntax))
    try:
        compressed = syntax.is_compressed
    except ValueError:  # not a transfer syntax pydicom knows (private, or a broken header)
        raise PixelError(f"{path}: unknown transfer syntax {syntax}; convert the file to a standard one "
                         "(e.g. gdcmconv --raw)") from None
    if not compressed or _can_decode(syntax):
        return
    package = _DICOM_PLUGINS.get(str(syntax))
    hint = f"pip install {package}" if package else "convert it to an uncompressed syntax (e.g. gdcmconv --raw)"
    raise DicomDecoderMissing(
        f"{path} is compressed with {syntax.name} (transfer syntax {syntax}), which the installed "
        f"pydicom cannot decode: {hint}"
    )


def _can_decode(syntax: Any) -> bool:
    """Whether an installed pydicom decoder (native or plugin) handles ``syntax``."""
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2.x: the handler list
        from pydicom import config

        return any(h.supports_transfer_syntax(syntax) and h.is_available() for h in config.pixel_data_handlers)
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # pydicom has no decoder for this syntax at all (e.g. MPEG video)
        return False


def _stored_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Keep only the Bits Stored low bits of each pixel, sign-extended when Pixel Representation is 1.

    A 12-bit image in 16-bit words may carry overlay or garbage bits above bit 11, and a signed
    one its sign at bit 11 (PS3.5 8.1.1); pydicom 3 already does this, pydicom 2 does not.
    Idempotent: already-clean values pass unchanged.
    """
    if arr.dtype.kind not in "iu":
        return arr
    bits = int(getattr(ds, "BitsStored", 0) or 0)
    if not 0 < bits < arr.dtype.itemsize * 8:
        return arr
    low = arr.astype(np.int64) & ((1 << bits) - 1)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) != 1:
        return low.astype(arr.dtype)
    sign = 1 << (bits - 1)
    return ((low ^ sign) - sign).astype(np.int32)  # two's complement of a bits-wide number


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued; the first pair is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window_unit(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map values through a DICOM VOI window to [0, 1].

    DICOM PS3.3 C.11.2.1.2: ``function`` is LINEAR (default), LINEAR_EXACT or SIGMOID.
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def to_uint8(
    img: np.ndarray,
    window: Optional[tuple[float, float]] = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Convert an image to uint8: uint8 passes unchanged, wider data is windowed.

    ``window=(center, width)`` applies that DICOM linear window. Without one the window
    is the robust ``percentiles`` range of the image itself (0.5-99.5 % by default),
    which ignores burned-in labels, collimator edges and hot pixels at the extremes;
    if that range is empty (near-binary image) the full min-max range is used, and a
    constant image becomes all zeros.
    """
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if img.ndim != 2:
        raise ValueError(f"to_uint8 expects a 2-D grayscale image, got shape {img.shape}")
    values = img.astype(np.float64)
    if window is not None:
        unit = window_unit(values, float(window[0]), float(window[1]))
    else:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(img.shape, np.uint8)
        lo, hi = np.percentile(finite, percentiles)
        if hi <= lo:
            lo, hi = finite.min(), finite.max()
        if hi <= lo:
            return np.zeros(img.shape, np.uint8)
        unit = (values - lo) / (hi - lo)
    unit = np.nan_to_num(np.clip(unit, 0.0, 1.0), nan=0.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def resize_square(img_u8: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio (LANCZOS, antialiased); letterbox-pad with 0 to size×size.

    The longer side becomes ``size``; the image is centred, the padding split evenly
    (the extra pixel, if any, goes to the bottom/right).
    """
    img_u8 = np.asarray(img_u8)
    if img_u8.dtype != np.uint8 or img_u8.ndim != 2:
        raise ValueError(
            f"resize_square expects a 2-D uint8 image, got {img_u8.dtype} {img_u8.shape}"
        )
    h, w = img_u8.shape
    if h == 0 or w == 0:
        raise ValueError(f"resize_square got an empty image of shape {img_u8.shape}")
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) == (h, w):
        resized = img_u8
    else:
        resized = np.asarray(
            Image.fromarray(img_u8).resize((new_w, new_h), Image.Resampling.LANCZOS)
        )
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _decode_task(
    task: tuple[int, str, int],
) -> tuple[int, Optional[np.ndarray], Optional[str], int, int]:
    """Worker: decode one image to its stored form; a bad image comes back as an error string."""
    pos, path, size = task
    try:
        img, (orig_h, orig_w) = _decode(Path(path), draft_size=size)
        return pos, resize_square(to_uint8(img), size), None, orig_h, orig_w
    except PixelError as exc:
        return pos, None, str(exc), -1, -1


# --------------------------------------------------------------------------- building


def shard_name(k: int) -> str:
    """File name of shard ``k``'s pixels; its index part is the same name with ``.parquet``."""
    return f"{SHARD_PREFIX}{k:05d}.npy"


def build_key(image_size: int) -> str:
    """What a finished shard must have been built with to be reused: the size and this decoder's code."""
    code = Path(__file__).read_bytes()
    return hashlib.sha256(code + f"|{image_size}".encode()).hexdigest()[:16]


def _files_digest(files: pa.Table, lo: int, hi: int) -> str:
    """A digest of rows [lo, hi) of the file fingerprint (size and mtime of each image)."""
    h = hashlib.sha256()
    for name in ("bytes", "mtime_ns"):
        column = files.column(name).slice(lo, hi - lo).fill_null(-1)  # -1: the file was missing
        h.update(column.to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:12]


def build_pixel_store(
    images: pa.Table,
    out_dir: Path,
    params: PixelsParams,
    base_dir: Path = Path("."),
    *,
    files: Optional[pa.Table] = None,
    progress: bool = True,
) -> dict:
    """Decode every row of ``images`` (image_id, study_id, path) into shards under ``out_dir``.

    Relative paths are resolved against ``base_dir``. Rows keep the table's order
    (``index.row`` == position). Shard ``k`` holds rows ``[k*B, (k+1)*B)`` with
    ``B = pixels.shard_images``; each shard and its index part are written under temporary
    names and renamed when complete, so an interruption loses only the shard being written.
    A re-run keeps every finished shard whose rows, image size and decoder code still match
    (see :func:`build_key`) and decodes only the rest. ``index.parquet`` is written last.

    ``files`` is ingest's fingerprint of the image files (``image_files.parquet``: bytes and
    mtime_ns per row, in ``images`` order). Given it, a shard is also rebuilt when one of its
    files changed size or mtime since the shard was built, and only that shard. The digest a
    shard was built from sits beside it (``pixels-0000k.fingerprint``, in ``.dvcignore``): mtimes
    are this machine's, so they stay out of what DVC hashes and the store is byte-identical
    wherever it is built.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    size = params.image_size
    image_ids, study_ids, paths = _validated_columns(images)
    if params.workers < 1:
        raise ValueError(f"pixels.workers must be >= 1, got {params.workers}")
    resolved = [None if p is None else str(Path(base_dir) / p) for p in paths]
    n = len(image_ids)
    per_shard = params.shard_images
    n_shards = -(-n // per_shard)
    key = build_key(size)

    for i, p in enumerate(resolved):
        if p is None and params.on_error == "fail":
            raise PixelError(_fail_message(image_ids[i], None, f"image {image_ids[i]!r} has no path in the images table"))
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[pa.Table] = []
    reused = 0
    with _decoder(params.workers, n) as decode:
        for k in range(n_shards):
            lo, hi = k * per_shard, min(n, (k + 1) * per_shard)
            fingerprint = out_dir / (shard_name(k)[:-4] + FINGERPRINT_SUFFIX)
            digest = None if files is None else _files_digest(files, lo, hi)
            part = _finished_shard(out_dir, k, key, image_ids[lo:hi], paths[lo:hi], size)
            if part is not None and digest is not None and (
                    not fingerprint.is_file() or fingerprint.read_text() != digest):
                part = None  # a file changed since (or no record of what the shard was built from)
            if part is not None:
                reused += 1
            else:
                fingerprint.unlink(missing_ok=True)
                part = _write_shard(out_dir, k, key, lo, image_ids[lo:hi], study_ids[lo:hi], paths[lo:hi],
                                    resolved[lo:hi], size, params.on_error, decode, progress)
                if digest is not None:
                    fingerprint.write_text(digest)
            parts.append(part)

    shard_col = pa.array(np.arange(n, dtype=np.int64) // per_shard)
    if parts:
        index = pa.concat_tables(parts).drop_columns(["build_key"])
    else:
        index = _index_part([], [], [], np.zeros(0, bool), [], np.zeros(0, np.int32), np.zeros(0, np.int32), 0, "")
        index = index.drop_columns(["build_key"])
    index = index.append_column("shard", shard_col).append_column(
        "shard_row", pa.array(np.arange(n, dtype=np.int64) % per_shard))
    index = index.replace_schema_metadata({b"image_size": str(size).encode(), b"shard_images": str(per_shard).encode()})
    partial_index = out_dir / (INDEX_FILE + PARTIAL_SUFFIX)
    pq.write_table(index, partial_index)
    os.replace(partial_index, out_dir / INDEX_FILE)
    # Shards past the end belong to a longer, older table: they would only confuse a reader.
    for stale in out_dir.glob(f"{SHARD_PREFIX}*"):
        number = stale.name[len(SHARD_PREFIX):].split(".")[0]
        if not number.isdigit() or int(number) >= n_shards or stale.name.endswith(PARTIAL_SUFFIX):
            stale.unlink()
    (out_dir / PIXELS_FILE).unlink(missing_ok=True)  # the single-file store of earlier versions

    ok = index.column("ok").to_numpy(zero_copy_only=False).astype(bool)
    errors = index.column("error").to_pylist()
    seconds = time.perf_counter() - start
    failures = [
        {"image_id": image_ids[i], "path": paths[i], "error": errors[i]}
        for i in np.flatnonzero(~ok)[:_MAX_FAILURES_IN_SUMMARY]
    ]
    return {
        "n_images": n,
        "n_ok": int(ok.sum()),
        "n_failed": int(n - ok.sum()),
        "failures": failures,
        "image_size": size,
        "workers": params.workers,
        "n_shards": n_shards,
        "n_shards_reused": reused,
        "shard_images": per_shard,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else 0.0,
    }


def _index_part(image_ids, study_ids, paths, ok, errors, orig_h, orig_w, lo: int, key: str) -> pa.Table:
    n = len(image_ids)
    return pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "study_id": pa.array(study_ids, pa.string()),
            "path": pa.array(paths, pa.string()),
            "row": pa.array(np.arange(lo, lo + n, dtype=np.int64)),
            "ok": pa.array(ok, pa.bool_()),
            "error": pa.array(errors, pa.string()),
            "orig_height": pa.array(orig_h, pa.int32(), mask=~ok),
            "orig_width": pa.array(orig_w, pa.int32(), mask=~ok),
            "build_key": pa.array([key] * n, pa.string()),
        }
    )


def _finished_shard(out_dir: Path, k: int, key: str, image_ids: list, paths: list, size: int) -> Optional[pa.Table]:
    """Shard ``k``'s index part when the shard on disk was built from these rows by this code, else None."""
    pixels_path = out_dir / shard_name(k)
    part_path = pixels_path.with_suffix(".parquet")
    if not (pixels_path.is_file() and part_path.is_file()):
        return None
    try:
        part = pq.read_table(part_path)
        shape = np.load(pixels_path, mmap_mode="r").shape
    except Exception:  # a damaged leftover is rebuilt, never trusted
        return None
    if (shape != (len(image_ids), size, size) or part.column("image_id").to_pylist() != image_ids
            or part.column("path").to_pylist() != paths or set(part.column("build_key").to_pylist()) - {key}):
        return None
    return part


def _write_shard(out_dir: Path, k: int, key: str, lo: int, image_ids: list, study_ids: list, paths: list,
                 resolved: list, size: int, on_error: str, decode, progress: bool) -> pa.Table:
    """Decode one shard's rows; write its pixels, then its index part, each renamed into place when whole."""
    n = len(image_ids)
    pixels_path = out_dir / shard_name(k)
    part_path = pixels_path.with_suffix(".parquet")
    part_path.unlink(missing_ok=True)  # the pixels change first: never a new shard beside an old part
    partial = out_dir / (shard_name(k) + PARTIAL_SUFFIX)
    ok = np.zeros(n, dtype=bool)
    errors: list[Optional[str]] = [None] * n
    orig_h = np.full(n, -1, dtype=np.int32)
    orig_w = np.full(n, -1, dtype=np.int32)
    for i, p in enumerate(resolved):
        if p is None:
            errors[i] = f"image {image_ids[i]!r} has no path in the images table"
    pixels = None
    try:
        pixels = open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, size, size))
        tasks = [(i, p, size) for i, p in enumerate(resolved) if p is not None]
        bar = tqdm(decode(tasks), total=len(tasks), desc=f"pixels shard {k}", unit="img", disable=not progress)
        for pos, img, error, h, w in bar:
            if error is not None:
                if on_error == "fail":
                    raise PixelError(_fail_message(image_ids[pos], resolved[pos], error))
                errors[pos] = error
                pixels[pos] = 0
                continue
            pixels[pos] = img
            ok[pos] = True
            orig_h[pos], orig_w[pos] = h, w
        pixels.flush()
        pixels = None  # close the map before the rename (required on Windows)
        os.replace(partial, pixels_path)
    except BaseException:
        pixels = None
        partial.unlink(missing_ok=True)
        raise
    part = _index_part(image_ids, study_ids, paths, ok, errors, orig_h, orig_w, lo, key)
    partial_part = out_dir / (part_path.name + PARTIAL_SUFFIX)
    pq.write_table(part, partial_part)
    os.replace(partial_part, part_path)
    return part


def _validated_columns(
    images: pa.Table,
) -> tuple[list[str], list[Optional[str]], list[Optional[str]]]:
    missing = [c for c in ("image_id", "study_id", "path") if c not in images.column_names]
    if missing:
        raise ValueError(
            f"images table lacks column(s) {missing}; expected the columns of "
            "data/interim/images.parquet (image_id, study_id, path, view)"
        )
    image_ids = images.column("image_id").to_pylist()
    if any(i is None for i in image_ids):
        row = image_ids.index(None)
        raise ValueError(f"images table: image_id is null in row {row}; every image needs an id")
    image_ids = [str(i) for i in image_ids]
    dupes = sorted(i for i, count in Counter(image_ids).items() if count > 1)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5]) + (" ..." if len(dupes) > 5 else "")
        raise ValueError(
            f"images table has {len(dupes)} duplicate image_id(s): {shown}; "
            "each image must appear once (fix the ingest step that wrote the table)"
        )
    study_ids = [None if s is None else str(s) for s in images.column("study_id").to_pylist()]
    paths = [None if p is None else str(p) for p in images.column("path").to_pylist()]
    return image_ids, study_ids, paths


def _fail_message(image_id: str, path: Optional[str], error: str) -> str:
    where = f" ({path})" if path else ""
    return (
        f"image {image_id!r}{where}: {error}\n"
        "Fix or remove the file (and its row in data/interim/images.parquet), or set "
        "`pixels.on_error: skip` in params.yaml to record the failure and continue. "
        "Finished shards are kept: the next run resumes after them."
    )


@contextlib.contextmanager
def _decoder(workers: int, n_tasks: int) -> Iterator[Callable[[list], Iterable[tuple]]]:
    """A function decoding tasks in order: in-process for one worker, else one process pool for every shard."""
    workers = min(workers, n_tasks)
    if workers <= 1:
        yield lambda tasks: map(_decode_task, tasks)
        return
    # spawn, not fork: the parent may hold threads (pyarrow, tqdm) that fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:  # __exit__ terminates the workers, also on an early failure
        def decode(tasks: list) -> Iterable[tuple]:
            # Ordered imap: chunks big enough to amortise IPC, small enough to keep all workers busy.
            chunksize = max(1, min(32, len(tasks) // (workers * 8)))
            return pool.imap(_decode_task, tasks, chunksize=chunksize)

        yield decode


# --------------------------------------------------------------------------- reading


class ShardedArray:
    """The shards read as one ``(N, S, S)`` uint8 array: an int, a slice or an int array of global rows."""

    def __init__(self, shards: list[np.ndarray], shard_images: int, image_size: int) -> None:
        self.shards = shards
        self.shard_images = shard_images
        n = sum(int(s.shape[0]) for s in shards)
        self.shape = (n, image_size, image_size)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {int(key)} is out of range for a pixel store of {self.shape[0]} images")
            return self.shards[row // self.shard_images][row % self.shard_images]
        if isinstance(key, slice):
            key = np.arange(self.shape[0])[key]
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows out of range for a pixel store of {self.shape[0]} images")
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        shard = rows // self.shard_images
        for k in np.unique(shard):  # one fancy-indexed read per shard touched
            mine = np.flatnonzero(shard == k)
            out[mine] = self.shards[k][rows[mine] % self.shard_images]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class PixelStore:
    """Read side of the pixel store: the shards as one read-only (N, S, S) uint8 array plus the index."""

    def __init__(self, out_dir: Path, array, index: pa.Table) -> None:
        self.out_dir = Path(out_dir)
        self.array = array
        self.index = index
        self.ok = index.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        self._rows: Optional[dict[str, int]] = None

    @classmethod
    def open(cls, out_dir: Path) -> "PixelStore":
        """Open a store written by :func:`build_pixel_store` (shards memory-mapped, not loaded)."""
        out_dir = Path(out_dir)
        index_path = out_dir / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: run the `pixels` stage (dvc repro pixels)")
        index = pq.read_table(index_path)
        meta = index.schema.metadata or {}
        if b"shard_images" not in meta:  # a single pixels.npy from before sharding
            single = out_dir / PIXELS_FILE
            if not single.is_file():
                raise FileNotFoundError(f"{single} not found: run the `pixels` stage (dvc repro pixels)")
            arrays, per_shard = [np.load(single, mmap_mode="r")], max(1, index.num_rows)
            size = int(arrays[0].shape[1]) if arrays[0].ndim == 3 else -1
        else:
            per_shard, size = int(meta[b"shard_images"]), int(meta[b"image_size"])
            n_shards = -(-index.num_rows // per_shard)
            arrays = []
            for k in range(n_shards):
                path = out_dir / shard_name(k)
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path} not found (shard {k} of {n_shards}): the store is incomplete, "
                        "rebuild it (dvc repro pixels)")
                arrays.append(np.load(path, mmap_mode="r"))
        for k, a in enumerate(arrays):
            expected = min(per_shard, index.num_rows - k * per_shard)
            if a.ndim != 3 or a.dtype != np.uint8 or a.shape[1:] != (size, size) or a.shape[0] != expected:
                raise ValueError(
                    f"{out_dir}: shard {k} is {a.dtype} {a.shape}, expected ({expected}, {size}, {size}) uint8 "
                    f"for {INDEX_FILE}; the store is inconsistent, rebuild it (dvc repro -f pixels)"
                )
        return cls(out_dir, ShardedArray(arrays, per_shard, size), index)

    def __reduce__(self):
        # Pickling (DataLoader workers) reopens the memmap instead of copying every pixel.
        return (PixelStore.open, (self.out_dir,))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.array.shape[1])

    def row_of(self, image_id: str) -> int:
        """Row of ``image_id`` in :attr:`array` (== its position in images.parquet)."""
        if self._rows is None:
            ids = self.index.column("image_id").to_pylist()
            self._rows = {image_id: row for row, image_id in enumerate(ids)}
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(
                f"image_id {image_id!r} is not in the pixel store {self.out_dir}; "
                "rebuild it if images.parquet changed (dvc repro pixels)"
            ) from None

    def get(self, image_id: str) -> np.ndarray:
        """The S×S uint8 pixels of one image; a failed (ok=False) image raises PixelError."""
        row = self.row_of(image_id)
        if not self.ok[row]:
            error = self.index.column("error")[row].as_py()
            raise PixelError(
                f"image {image_id!r} failed to decode when the store was built: {error}; "
                "select images with PixelStore.ok"
            )
        return self.array[row]


# --------------------------------------------------------------------------- benchmark


def benchmark(n_images: int = 300, image_size: int = 224, workers: int = 1) -> dict:
    """Images/s of :func:`build_pixel_store` on synthetic 256 px 8-bit PNGs in a temp dir."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    with tempfile.TemporaryDirectory(prefix="medfilip-pixels-bench-") as tmp:
        tmp = Path(tmp)
        ids, paths = [], []
        for i in range(n_images):
            # A smooth body plus noise: compresses like a radiograph, not like a flat test card.
            body = 128 + 80 * np.sin(xx / (20 + i % 7)) * np.cos(yy / 31)
            img = np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp / f"img{i:05d}.png")
            ids.append(f"img{i:05d}")
            paths.append(f"img{i:05d}.png")
        table = pa.table({"image_id": ids, "study_id": ids, "path": paths})
        params = PixelsParams(image_size=image_size, on_error="fail", workers=workers)
        summary = build_pixel_store(table, tmp / "store", params, base_dir=tmp, progress=False)
    return {
        "n_images": n_images,
        "image_size": image_size,
        "workers": workers,
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
    }
