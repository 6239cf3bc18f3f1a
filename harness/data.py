"""CIFAR-10 from any supported source, decoded once into cached uint8 arrays with a data identity."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from contract.arrays import ARRAY_NAMES, arrays_sha256
from harness.env import default_cache_dir, user_path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_COUNTS = {"train": 5000, "test": 1000}  # images per class
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
SUPPORTED = (
    "a torchvision CIFAR-10 folder (containing cifar-10-batches-py), the original cifar-10-python.tar.gz, "
    "an image-folder tree laid out train/<class>/* and test/<class>/*, or a .tar/.tar.gz of such a tree"
)


class DataError(ValueError):
    """A data source that is missing, corrupt or not laid out as CIFAR-10."""


@dataclass(frozen=True)
class DataIdentity:
    kind: str  # "torchvision", "cifar10-python-tar", "image-folder" or "image-folder-tar"
    source_sha256: str  # checksum of the source files (the cache key)
    data_sha256: str  # checksum of the decoded arrays: what every result carries

    def describe(self) -> str:
        label = {"torchvision": "torchvision original", "cifar10-python-tar": "original python tarball",
                 "image-folder": "image folder", "image-folder-tar": "image-folder archive"}[self.kind]
        return f"cifar10 ({label}, source sha256 {self.source_sha256[:8]}, pixels sha256 {self.data_sha256[:8]})"


@dataclass(frozen=True)
class Dataset:
    data_dir: Path  # folder of cached arrays: train_x.npy, train_y.npy, test_x.npy, test_y.npy, identity.json
    identity: DataIdentity
    classes: tuple[str, ...]
    train_y: np.ndarray
    test_y: np.ndarray


def load_cifar10(source: str | Path | None, cache_dir: Path | None = None,
                 counts: dict[str, int] = CIFAR10_COUNTS) -> Dataset:
    """Resolve, decode (once) and validate CIFAR-10. `source` None means torchvision's folder in the cache.

    `counts` is the number of images per class expected in each split (tests pass smaller trees)."""
    cache_dir = user_path(cache_dir) if cache_dir else default_cache_dir()
    # ~ expanded and made absolute once, keeping the names the user gave (a symlink named cifar-10-batches-py)
    path = Path(os.path.abspath(os.path.expanduser(source))) if source is not None else cache_dir / "torchvision"
    if source is None and not _batches_dir(path).is_dir():  # torchvision's folder is downloaded on first use
        _torchvision_download(path)
    kind, files = _inspect(path)
    source_sha = _sha256_files(files, base=path if path.is_dir() else path.parent)
    entry = cache_dir / "arrays" / f"cifar10-{kind}-{source_sha[:16]}"
    with cache_lock(entry) as writable:  # one process decodes; the others wait for it and read its entry
        cached = _read_cached(entry, source_sha, path)
        if cached is not None:
            meta, train_y, test_y = cached
        elif not writable:
            raise DataError(f"the cache folder {entry.parent} cannot be written (read-only or another user's) and "
                            f"holds no whole copy of this data set; give --cache-dir (or $FIXMATCH_BENCH_CACHE) a "
                            f"folder you can write")
        else:
            arrays, classes, kind = _decode(kind, path)
            _validate(arrays, classes, str(path), counts)
            meta = {"kind": kind, "source_sha256": source_sha, "data_sha256": arrays_sha256(arrays),
                    "classes": list(classes), "source": str(path)}
            _write_entry(entry, arrays, meta)
            train_y, test_y = arrays["train_y"], arrays["test_y"]
    identity = DataIdentity(meta["kind"], meta["source_sha256"], meta["data_sha256"])
    return Dataset(entry, identity, tuple(meta["classes"]), train_y, test_y)


@contextlib.contextmanager
def cache_lock(entry: Path):
    """An exclusive lock on ENTRY.lock while a cache entry is checked and maybe built; yields whether the cache folder
    can be written (a read-only one is still read, without the lock: nobody can be building it there)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        f = open(entry.with_name(entry.name + ".lock"), "a")
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OSError(e.errno, e.strerror, str(entry.parent)) from None
        yield False
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_entry(entry: Path, arrays: dict, meta: dict) -> None:
    """The arrays and identity.json into a folder of this process's own, moved into place whole (under the lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name in ARRAY_NAMES:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "identity.json").write_text(json.dumps(meta, indent=2) + "\n")
        if entry.exists():  # a damaged entry (_read_cached said so): replaced whole
            shutil.rmtree(entry)
        tmp.replace(entry)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(entry)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cached(entry: Path, source_sha: str, source: Path) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(identity, train_y, test_y) of a whole cache entry; None if there is none, or, after one line saying what is
    damaged, if it is not whole: identity.json readable and naming this source, the four arrays readable with
    CIFAR-10's layout, and their pixels' sha256 the one identity.json records (about a second for CIFAR-10)."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "identity.json").read_text())
        if not isinstance(meta, dict) or meta.get("source_sha256") != source_sha:
            raise ValueError("identity.json does not name this source")
        missing = [k for k in ("kind", "data_sha256", "classes") if k not in meta]
        if missing:
            raise ValueError(f"identity.json lacks {missing}")
        arrays = {n: np.load(entry / f"{n}.npy", allow_pickle=False) for n in ARRAY_NAMES}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.ndim != 1 or len(y) != len(x) \
                    or y.dtype.kind not in "iu":
                raise ValueError(f"{split} arrays are {x.dtype}{x.shape} and {y.dtype}{y.shape}")
        if arrays_sha256(arrays) != meta["data_sha256"]:
            raise ValueError("the arrays' sha256 is not the one identity.json records")
    except (OSError, ValueError, EOFError) as e:  # json.JSONDecodeError is a ValueError
        print(f"warning: cached data {entry} is damaged ({type(e).__name__}: {e}); rebuilding it from {source}",
              file=sys.stderr)
        return None
    return meta, arrays["train_y"], arrays["test_y"]


def _batches_dir(path: Path) -> Path:
    """The cifar-10-batches-py folder of a torchvision CIFAR-10 folder, or the folder itself if it is that one."""
    return path if path.name == "cifar-10-batches-py" else path / "cifar-10-batches-py"


def _torchvision_download(root: Path) -> None:
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"could not download CIFAR-10 into {root} ({e}); pass --data with {SUPPORTED}") from None


def _inspect(path: Path) -> tuple[str, list[Path]]:
    """Which kind of source `path` is, and the files its checksum covers."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist; expected {SUPPORTED}")
    if path.is_dir():
        batches = _batches_dir(path)
        if batches.is_dir():
            names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
            missing = [n for n in names if not (batches / n).is_file()]
            if missing:
                raise DataError(f"torchvision CIFAR-10 folder {batches} lacks {missing}")
            return "torchvision", [batches / n for n in names]
        if (path / "train").is_dir() and (path / "test").is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return "image-folder", files
        raise DataError(f"data folder {path} has neither cifar-10-batches-py/ nor train/ and test/ folders; "
                        f"expected {SUPPORTED}")
    if not tarfile.is_tarfile(path):
        raise DataError(f"data file {path} is not a tar archive; expected {SUPPORTED}")
    return "tar", [path]


def _sha256_files(files: list[Path], base: Path) -> str:
    """A single file: its plain sha256 (as `sha256sum` prints it). Several: over each relative name and content."""
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(str(f.relative_to(base)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _decode(kind: str, path: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], str]:
    """The arrays, the class names, and the source kind (a tar's kind is known once it is read)."""
    if kind == "torchvision":
        batches = _batches_dir(path)
        files = {p.name: p.read_bytes() for p in batches.iterdir() if p.is_file()}
        return (*_decode_python_batches(files, str(path)), kind)
    if kind == "image-folder":
        members = {str(p.relative_to(path)): p.read_bytes for p in path.rglob("*") if p.is_file()}
        return (*_decode_image_tree(members, str(path)), kind)
    return _decode_tar(path)


def _decode_tar(path: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], str]:
    try:
        with tarfile.open(path) as tar:
            blobs = {}
            for m in tar.getmembers():
                if m.isfile():
                    blobs[m.name] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(f"archive {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    names = {n.split("/")[-1] for n in blobs}
    if "data_batch_1" in names:
        files = {n.split("/")[-1]: b for n, b in blobs.items()}
        return (*_decode_python_batches(files, str(path)), "cifar10-python-tar")
    return (*_decode_image_tree({n: (lambda b=b: b) for n, b in blobs.items()}, str(path)), "image-folder-tar")


class _Refused(Exception):
    """A pickle asked for something CIFAR-10's batches do not contain."""


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused("an array of Python objects")
    return dtype


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """How Python 3 pickles bytes at protocol 2 (_codecs.encode(text, "latin1")); no other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


# The only globals a CIFAR-10 batch may name: numpy's array and dtype rebuilders under their numpy 1 and 2 module
# names, at every pickle protocol, and the bytes encoder of protocol 2. Dicts, lists, strings, bytes and numbers
# need none. Each is looked up from a live object, so the real function whatever numpy calls its module.
_ALLOWED = MappingProxyType({
    **{(m, "_reconstruct"): np.ndarray(0).__reduce__()[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): np.ndarray(1).__reduce_ex__(5)[0] for m in ("numpy.core.numeric", "numpy._core.numeric")},
    **{(m, "scalar"): np.int64(0).__reduce__()[0] for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype, ("_codecs", "encode"): _latin1_bytes,
})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's python batches hold, and refuses every other global (a pickle that names os.system
    or any other callable would run it)."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _decode_python_batches(files: dict[str, bytes], where: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    def unpickle(name: str, keys: tuple[str, ...]) -> dict:
        if name not in files:
            raise DataError(f"CIFAR-10 python data in {where} lacks {name}")
        try:
            content = _CifarUnpickler(io.BytesIO(files[name]), encoding="latin1").load()
        except _Refused as e:
            raise DataError(f"CIFAR-10 file {name} in {where} is refused: it asks for {e}, which CIFAR-10's batches "
                            f"do not contain (nothing of it was run); use the original cifar-10-python.tar.gz"
                            ) from None
        except Exception as e:
            raise DataError(f"CIFAR-10 file {name} in {where} is corrupt ({type(e).__name__}: {e})") from None
        if not isinstance(content, dict) or any(k not in content for k in keys):
            raise DataError(f"CIFAR-10 file {name} in {where} is not a CIFAR-10 batch (no {keys} in it)")
        return content

    def stack(names):
        parts = [unpickle(n, ("data", "labels")) for n in names]
        try:
            x = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
            y = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
        except (ValueError, TypeError) as e:
            raise DataError(f"CIFAR-10 batches {', '.join(names)} in {where} hold no 32x32 RGB images "
                            f"({type(e).__name__}: {e})") from None
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y

    train_x, train_y = stack([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = stack(["test_batch"])
    classes = tuple(unpickle("batches.meta", ("label_names",))["label_names"])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, classes


def _decode_image_tree(members: dict, where: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """members: relative path -> callable returning the bytes. Paths may carry one leading folder."""
    from PIL import Image, UnidentifiedImageError

    by_split: dict[str, dict[str, list[tuple[str, object]]]] = {"train": {}, "test": {}}
    for name, read in members.items():
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if len(parts) >= 3 and parts[-3] in by_split:
            split, cls, fname = parts[-3:]
        else:
            continue
        if fname.startswith("."):
            continue
        by_split[split].setdefault(cls, []).append((fname, read))
    if not by_split["train"] or not by_split["test"]:
        raise DataError(f"{where} is not laid out as train/<class>/* and test/<class>/* image folders")
    classes = tuple(sorted(by_split["train"]))
    if tuple(sorted(by_split["test"])) != classes:
        raise DataError(f"{where}: train classes {classes} differ from test classes {tuple(sorted(by_split['test']))}")
    out = {}
    for split, per_class in by_split.items():
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for fname, read in sorted(per_class[cls], key=lambda t: _natural_key(t[0])):
                rel = f"{split}/{cls}/{fname}"
                if not fname.lower().endswith(IMAGE_SUFFIXES):
                    raise DataError(f"{where}: {rel} is not an image file (expected one of {IMAGE_SUFFIXES})")
                try:
                    with Image.open(io.BytesIO(read())) as im:
                        im.load()
                        if im.mode != "RGB":
                            raise DataError(f"{where}: {rel} is {im.mode}, expected an RGB image")
                        arr = np.asarray(im, dtype=np.uint8)
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise DataError(f"{where}: {rel} is not a readable image ({e})") from None
                if arr.shape != (32, 32, 3):
                    raise DataError(f"{where}: {rel} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32 RGB")
                xs.append(arr)
                ys.append(label)
        out[f"{split}_x"] = np.stack(xs) if xs else np.zeros((0, 32, 32, 3), np.uint8)
        out[f"{split}_y"] = np.asarray(ys, dtype=np.int64)
    return out, classes


def _natural_key(name: str):
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _validate(arrays: dict[str, np.ndarray], classes: tuple[str, ...], where: str,
              counts: dict[str, int]) -> None:
    if tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"{where}: classes {tuple(classes)} are not CIFAR-10's {CIFAR10_CLASSES}")
    for split, per_class in counts.items():
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
            raise DataError(f"{where}: {split} images are {x.dtype}{x.shape}, expected uint8 (N, 32, 32, 3)")
        found = np.bincount(y, minlength=len(classes))
        if len(x) != len(y) or (found != per_class).any():
            raise DataError(f"{where}: {split} has {len(x)} images with per-class counts {found.tolist()}, "
                            f"expected {per_class} per class ({per_class * len(classes)} in all)")


# The IJG (libjpeg) standard luminance quantization table, natural order, which quality q scales (ITU T.81 K.1).
_IJG_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def describe_pixels(kind: str, source: str | Path | None) -> str:
    """How the source stores its pixels, for reports: the original release's raw bytes, or the image format of an
    image-folder source (JPEG with its IJG quality, read off the first image's quantization table: lossy, so its
    pixels differ from the original release)."""
    if kind in ("torchvision", "cifar10-python-tar"):
        return "the original CIFAR-10 pixels"
    first = _first_image_bytes(Path(source)) if source is not None else None
    if first is None:
        return "image files"
    from PIL import Image

    with Image.open(io.BytesIO(first)) as im:
        if im.format != "JPEG":
            return f"{im.format} image files (lossless: the original pixels if made from the release)"
        quality = _ijg_quality(list(im.quantization.get(0, [])))
    q = f" quality {quality}" if quality else " (non-standard quantization tables)"
    return (f"JPEG{q} image files: lossy, so pixels differ slightly from the original release and absolute "
            f"accuracies are not directly comparable with published ones; runs on the same pixels are")


def _ijg_quality(table: list[int]) -> int | None:
    """The IJG quality 1..100 whose scaled standard luminance table is `table` (natural order), if any."""
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        if [min(max((v * scale + 50) // 100, 1), 255) for v in _IJG_LUMINANCE] == table:
            return q
    return None


def _first_image_bytes(path: Path) -> bytes | None:
    """The bytes of the first image file of an image-folder tree or of its tar archive (None if none is found)."""
    if path.is_dir():
        first = next((p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)
        return first.read_bytes() if first else None
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                return tar.extractfile(m).read()
    return None
