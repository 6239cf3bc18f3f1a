"""The CIFAR-10 data layer: every source kind, the cache, validation and its error messages."""
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from harness.data import CIFAR10_CLASSES, DataError, load_cifar10

SMALL = {"train": 2, "test": 1}  # images per class in the hand-made trees


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def make_tree(root, counts=SMALL, fmt="PNG"):
    """train/<class>/N.png and test/<class>/N.png with known pixels; returns {(split, class, n): pixels}."""
    pixels = {}
    for split, per in counts.items():
        for c, cls in enumerate(CIFAR10_CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for n in range(per):
                arr = _image(hash((split, c, n)) % 2**32)
                Image.fromarray(arr).save(d / f"{n}.{fmt.lower()}", format=fmt)
                pixels[(split, c, n)] = arr
    return pixels


def test_image_folder_tree_loads_in_class_then_file_order(tmp_path):
    pixels = make_tree(tmp_path / "tree")
    ds = load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", counts=SMALL)
    train_x = np.load(ds.data_dir / "train_x.npy")
    assert ds.identity.kind == "image-folder"
    assert ds.classes == CIFAR10_CLASSES
    assert train_x.shape == (20, 32, 32, 3) and train_x.dtype == np.uint8
    assert ds.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    np.testing.assert_array_equal(train_x[7], pixels[("train", 3, 1)])  # class 3, file 1 -> index 3*2+1


def test_tarball_of_a_tree_gives_the_same_pixels_as_the_tree(tmp_path):
    make_tree(tmp_path / "tree" / "cifar")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "cifar", arcname="cifar")
    from_dir = load_cifar10(tmp_path / "tree" / "cifar", cache_dir=tmp_path / "c1", counts=SMALL)
    from_tar = load_cifar10(archive, cache_dir=tmp_path / "c2", counts=SMALL)
    assert from_tar.identity.kind == "image-folder-tar"
    assert from_tar.identity.data_sha256 == from_dir.identity.data_sha256
    assert from_tar.identity.source_sha256 != from_dir.identity.source_sha256


def test_cache_is_reused_and_keyed_by_source(tmp_path):
    make_tree(tmp_path / "tree")
    first = load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", counts=SMALL)
    marker = first.data_dir / "train_x.npy"
    mtime = marker.stat().st_mtime_ns
    again = load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", counts=SMALL)
    assert again.data_dir == first.data_dir and marker.stat().st_mtime_ns == mtime
    # Change one pixel of one file: a new source checksum, a new cache entry, new pixel checksum.
    f = tmp_path / "tree" / "train" / "cat" / "0.png"
    arr = np.asarray(Image.open(f)).copy()
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(f)
    changed = load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", counts=SMALL)
    assert changed.data_dir != first.data_dir
    assert changed.identity.data_sha256 != first.identity.data_sha256


def _python_batches(root):
    """A miniature cifar-10-batches-py folder with the original pickle layout (CHW rows)."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    labels = [c for c in range(10) for _ in range(1)]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        (d / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    return d


def test_torchvision_folder_and_python_tarball_agree(tmp_path):
    batches = _python_batches(tmp_path / "tv")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    counts = {"train": 5, "test": 1}
    tv = load_cifar10(tmp_path / "tv", cache_dir=tmp_path / "c", counts=counts)
    tz = load_cifar10(archive, cache_dir=tmp_path / "c", counts=counts)
    assert (tv.identity.kind, tz.identity.kind) == ("torchvision", "cifar10-python-tar")
    assert tv.identity.data_sha256 == tz.identity.data_sha256
    # The first row of data_batch_1 is image 0, stored channel-major: pixel (0, 0) is (row[0], row[1024], row[2048]).
    row = pickle.loads((batches / "data_batch_1").read_bytes())["data"][0]
    x0 = np.load(tv.data_dir / "train_x.npy")[0]
    assert x0[0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert x0[31, 31].tolist() == [row[1023], row[2047], row[3071]]


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"data path .*nowhere does not exist; expected"):
        load_cifar10(tmp_path / "nowhere", cache_dir=tmp_path / "c")


def test_truncated_archive_is_reported_as_corrupt(tmp_path):
    make_tree(tmp_path / "tree")
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname=".")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_cifar10(archive, cache_dir=tmp_path / "c", counts=SMALL)


def test_not_an_archive(tmp_path):
    f = tmp_path / "x.tar.gz"
    f.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="is not a tar archive"):
        load_cifar10(f, cache_dir=tmp_path / "c")


def test_wrong_layout(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="neither cifar-10-batches-py/ nor train/ and test/"):
        load_cifar10(tmp_path / "d", cache_dir=tmp_path / "c")


def test_non_image_file_is_named(tmp_path):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"train/dog/notes.txt is not an image file"):
        load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "c", counts=SMALL)


def test_undecodable_image_is_named(tmp_path):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "ship" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"test/ship/0.png is not a readable image"):
        load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "c", counts=SMALL)


def test_wrong_size_and_wrong_counts(tmp_path):
    make_tree(tmp_path / "tree")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "tree" / "train" / "bird" / "1.png")
    with pytest.raises(DataError, match=r"train/bird/1.png is 28x28, expected 32x32 RGB"):
        load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "c", counts=SMALL)
    make_tree(tmp_path / "tree2")
    with pytest.raises(DataError, match=r"train has 20 images with per-class counts \[2, 2, .*expected 5000 per class"):
        load_cifar10(tmp_path / "tree2", cache_dir=tmp_path / "c")  # CIFAR-10's real counts expected


def test_real_archive_counts_and_pixels_match_pil(shared_archive, cifar):
    train_x = np.load(cifar.data_dir / "train_x.npy", mmap_mode="r")
    test_x = np.load(cifar.data_dir / "test_x.npy", mmap_mode="r")
    assert train_x.shape == (50000, 32, 32, 3) and test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(cifar.train_y).tolist() == [5000] * 10
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10
    assert cifar.identity.source_sha256 == "0493b9c94c62a5e8a6b98a28016b4eebed4fa9aac8154143eead5d26fc94fabb"
    # One named file, decoded independently by PIL: train/horse is class 7, so its files start at index 35000.
    with tarfile.open(shared_archive) as tar:
        names = sorted(n for n in tar.getnames() if "/train/horse/" in "/" + n and n.endswith(".jpg"))
        name = names[0]
        expected = np.asarray(Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB"))
    stems = sorted(int(n.rsplit("/", 1)[1].split(".")[0]) for n in names)
    assert name.rsplit("/", 1)[1].split(".")[0] in {str(stems[0]), f"{stems[0]:04d}"}
    np.testing.assert_array_equal(train_x[35000], expected)
    assert cifar.train_y[35000] == 7
