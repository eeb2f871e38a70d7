"""Tiny datasets in their real on-disk formats, and a loopback HTTP server to download them from."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_lightning.data.decode import load_rgb

# --- loopback server ---------------------------------------------------------------------------


@dataclass
class Loopback:
    """Files served at ``url(name)``; ``cuts[name] = n`` cuts the next n bodies in half."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    cuts: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    ranges: bool = True  # honour Range requests (HTTP 206)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def add(self, name: str, data: bytes | Path) -> str:
        self.files[name] = data.read_bytes() if isinstance(data, Path) else data
        return self.url(name)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 -- http.server's naming
        state: Loopback = self.server.state
        name = self.path.lstrip("/")
        state.requests.append((name, self.headers.get("Range")))
        data = state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start, range_header = 0, self.headers.get("Range")
        if range_header and state.ranges:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.cuts.get(name, 0) > 0:  # promise the whole body, send half, hang up
            state.cuts[name] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = Loopback(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server.state
    server.shutdown()
    server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpeg_bytes(color, size=(16, 16), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


# --- CIFAR-10: python pickle batches + cifar-10-python.tar.gz ----------------------------------

CIFAR_PER_CLASS_PER_BATCH = 2  # 5 batches -> 10 train images per class; test 2 per class


@dataclass
class CifarFixture:
    root: Path  # holds cifar-10-batches-py (download: false)
    archive: Path  # cifar-10-python.tar.gz in the real layout
    md5s: dict[str, str]


def _cifar_batch(rng: np.random.Generator, label_name: str) -> dict:
    labels = np.repeat(np.arange(10), CIFAR_PER_CLASS_PER_BATCH)
    rng.shuffle(labels)
    # class-coloured images plus noise: real uint8 rows of 3072 = R plane, G plane, B plane
    base = (labels[:, None] * 25).astype(np.int16)
    data = np.clip(base + rng.integers(0, 30, size=(len(labels), 3072)), 0, 255).astype(np.uint8)
    return {
        "batch_label": label_name,
        "labels": labels.tolist(),
        "data": data,
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }


@pytest.fixture(scope="session")
def cifar10_files(tmp_path_factory) -> CifarFixture:
    from tl_lightning.data.cifar10 import CIFAR10_CLASSES

    base = tmp_path_factory.mktemp("cifar")
    folder = base / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        label = f"training batch {i + 1} of 5" if name != "test_batch" else "testing batch 1 of 1"
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(rng, label), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 20, "num_vis": 3072},
            f,
            protocol=2,
        )
    archive = base / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    return CifarFixture(
        folder.parent, archive, {n: md5(folder / n) for n in [*names, "batches.meta"]}
    )


@pytest.fixture
def cifar10_patched(cifar10_files, monkeypatch):
    """Point torchvision's CIFAR10 checksums at the fixture's files (its URL stays unset)."""
    from torchvision.datasets import CIFAR10

    m = cifar10_files.md5s
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", m[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", m["test_batch"]]])
    monkeypatch.setattr(
        CIFAR10,
        "meta",
        {"filename": "batches.meta", "key": "label_names", "md5": m["batches.meta"]},
    )
    monkeypatch.setattr(
        CIFAR10, "url", "http://127.0.0.1:9/unreachable.tar.gz"
    )  # never the real host
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(cifar10_files.archive))
    return cifar10_files


# --- Flowers-102: jpg/ + imagelabels.mat + setid.mat + 102flowers.tgz --------------------------


@dataclass
class FlowersFixture:
    root: Path  # holds flowers-102/ (download: false)
    archive: Path  # 102flowers.tgz with jpg/image_XXXXX.jpg
    labels_mat: Path
    setid_mat: Path


@pytest.fixture(scope="session")
def flowers102_files(tmp_path_factory) -> FlowersFixture:
    from scipy.io import savemat

    base = tmp_path_factory.mktemp("flowers")
    folder = base / "root" / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 103), 3)  # 1-based, 3 images per class
    rng.shuffle(labels)
    for image_id, label in enumerate(labels, start=1):
        color = (int(label) * 2, 255 - int(label) * 2, (int(label) * 37) % 256)
        (folder / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(jpeg_bytes(color, (20, 16)))
    ids = {int(c): np.flatnonzero(labels == c) + 1 for c in range(1, 103)}
    split = {
        key: np.sort([ids[c][k] for c in range(1, 103)])
        for k, key in enumerate(["trnid", "valid", "tstid"])
    }
    savemat(folder / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    savemat(folder / "setid.mat", {k: v[None, :].astype(np.uint16) for k, v in split.items()})
    archive = base / "102flowers.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder / "jpg", arcname="jpg")
    return FlowersFixture(folder.parent, archive, folder / "imagelabels.mat", folder / "setid.mat")


@pytest.fixture
def flowers102_patched(flowers102_files, monkeypatch):
    """Point the Flowers102 checksums at the fixture's files."""
    import tl_lightning.data.flowers102 as flowers102

    f = flowers102_files
    monkeypatch.setattr(
        flowers102,
        "FLOWERS102_FILES",
        {
            "image": ("102flowers.tgz", md5(f.archive)),
            "label": ("imagelabels.mat", md5(f.labels_mat)),
            "setid": ("setid.mat", md5(f.setid_mat)),
        },
    )
    monkeypatch.setattr(flowers102, "FLOWERS102_URL", "http://127.0.0.1:9/")
    return f


# --- PetImages: a zip with valid, odd-but-valid and broken files of every kind ------------------

PET_PER_CLASS = 10
# kind -> relative path; these must be skipped with a reason starting with the kind
PET_BROKEN = {
    "empty file": "PetImages/Cat/666.jpg",
    "truncated": "PetImages/Dog/11702.jpg",
    "undecodable": "PetImages/Cat/garbage.jpg",
    "not an image file": "PetImages/Dog/Thumbs.db",
}
# these must load as RGB
PET_ODD = {
    "grayscale": "PetImages/Cat/gray.jpg",
    "cmyk": "PetImages/Dog/cmyk.jpg",
    "png_named_jpg": "PetImages/Cat/png.jpg",
    "gif_named_jpg": "PetImages/Dog/gif.jpg",
    "exif_rotated": "PetImages/Cat/rotated.jpg",
}


def exif_rotated_jpeg() -> bytes:
    """20x10 (w x h) red-left / blue-right, EXIF orientation 6 (display rotated 90 deg clockwise)."""
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def pet_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for c, cls in enumerate(["Cat", "Dog"]):
        for i in range(PET_PER_CLASS):
            files[f"PetImages/{cls}/{i}.jpg"] = jpeg_bytes(
                (200 * c, 40 + 15 * i, 200 - 200 * c), (24, 20)
            )
    good = jpeg_bytes((10, 200, 30), (64, 48))
    files[PET_BROKEN["empty file"]] = b""
    files[PET_BROKEN["truncated"]] = good[: len(good) // 2]
    files[PET_BROKEN["undecodable"]] = b"<html>this is not an image</html>" * 4
    files[PET_BROKEN["not an image file"]] = b"\xd0\xcf\x11\xe0 thumbnail cache"
    files[PET_ODD["grayscale"]] = jpeg_bytes(128, mode="L")
    files[PET_ODD["cmyk"]] = jpeg_bytes((0, 255, 255, 0), mode="CMYK")  # pure red in CMYK
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(buf, format="PNG")
    files[PET_ODD["png_named_jpg"]] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("P", (16, 16), 3).save(buf, format="GIF")
    files[PET_ODD["gif_named_jpg"]] = buf.getvalue()
    files[PET_ODD["exif_rotated"]] = exif_rotated_jpeg()
    return files


@pytest.fixture(scope="session")
def petimages_zip(tmp_path_factory) -> Path:
    """``kagglecatsanddogs_5340.zip`` in the real layout (top-level extras, PetImages/{Cat,Dog})."""
    path = tmp_path_factory.mktemp("pets") / "kagglecatsanddogs_5340.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("CDLA-Permissive-2.0.pdf", b"%PDF-1.4 licence")
        zf.writestr("readme[1].txt", "Microsoft Cats vs Dogs")
        for name, data in pet_files().items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def petimages_root(petimages_zip, tmp_path) -> Path:
    """A ``root`` with the archive already extracted (``root/cats_dogs/PetImages``)."""
    root = tmp_path / "data"
    with zipfile.ZipFile(petimages_zip) as zf:
        zf.extractall(root / "cats_dogs")
    return root


@pytest.fixture
def class_folder(tmp_path):
    """Write ``{class}/*.jpg`` folders: ``class_folder({"a": 12, "b": 4})`` -> its path."""

    def make(counts: dict[str, int], name: str = "images") -> Path:
        folder = tmp_path / name
        shutil.rmtree(folder, ignore_errors=True)
        for c, (cls, n) in enumerate(counts.items()):
            (folder / cls).mkdir(parents=True)
            for i in range(n):
                (folder / cls / f"{i}.jpg").write_bytes(
                    jpeg_bytes((60 * c, 10 * i % 256, 90), (20, 20))
                )
        return folder

    return make


@pytest.fixture
def count_loads(monkeypatch):
    """Count the decodes done by the Cats-vs-Dogs scan (list of paths)."""
    import tl_lightning.data.cats_dogs as cats_dogs

    calls: list[Path] = []

    def counting(path):
        calls.append(Path(path))
        return load_rgb(path)

    monkeypatch.setattr(cats_dogs, "load_rgb", counting)
    return calls
