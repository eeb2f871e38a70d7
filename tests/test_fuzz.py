"""Property-based tests (hypothesis): episodic sampler, splits, transforms, and the image loader."""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tl_lightning.backbones import DataConfig
from tl_lightning.data.dataset import ImageFilesDataset
from tl_lightning.data.decode import FailedSample, load_rgb
from tl_lightning.data.episodes import EpisodicBatchSampler
from tl_lightning.data.scan import check_image
from tl_lightning.data.split import carve_val, stratified_split
from tl_lightning.data.transforms import eval_transform, train_transform

FAST = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FILES = settings(
    max_examples=60,
    database=None,  # no .hypothesis folder in the repository
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- episodic sampler --------------------------------------------------------------------------
@st.composite
def episodes_setup(draw):
    """Labels with enough classes and samples for a valid (way, shot, query)."""
    way = draw(st.integers(1, 5))
    shot = draw(st.integers(1, 3))
    query = draw(st.integers(0, 3))
    n_classes = draw(st.integers(way, 8))
    class_ids = draw(
        st.lists(st.integers(0, 50), min_size=n_classes, max_size=n_classes, unique=True)
    )
    sizes = draw(
        st.lists(
            st.integers(shot + query, shot + query + 4), min_size=n_classes, max_size=n_classes
        )
    )
    labels = np.repeat(class_ids, sizes)
    labels = draw(st.permutations(labels.tolist()))
    return labels, way, shot, query


@FAST
@given(
    setup=episodes_setup(),
    episodes=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    world=st.integers(1, 3),
)
def test_every_episode_has_way_distinct_classes_of_shot_plus_query_distinct_indices(
    setup, episodes, seed, world
):
    labels, way, shot, query = setup
    labels = np.asarray(labels)
    drawn = []
    for rank in range(world):
        sampler = EpisodicBatchSampler(
            labels, way, shot, query, episodes, seed=seed, rank=rank, world_size=world
        )
        batches = list(sampler)
        assert len(batches) == len(sampler)
        drawn += batches
        for batch in batches:
            assert len(batch) == way * (shot + query) and len(set(batch)) == len(batch)
            assert all(0 <= i < len(labels) for i in batch)
            support = np.asarray(batch[: way * shot]).reshape(way, shot)
            classes = [labels[row[0]] for row in support]
            assert len(set(classes)) == way
            assert all((labels[row] == c).all() for row, c in zip(support, classes, strict=True))
            if query:
                queries = np.asarray(batch[way * shot :]).reshape(way, query)
                assert all(
                    (labels[row] == c).all() for row, c in zip(queries, classes, strict=True)
                )
    single = list(EpisodicBatchSampler(labels, way, shot, query, episodes, seed=seed))
    assert len(drawn) >= len(single) and all(b in drawn for b in single)  # ranks split one stream


# --- splits ------------------------------------------------------------------------------------
fractions_st = st.lists(st.integers(1, 20), min_size=2, max_size=4).map(
    lambda w: [x / sum(w) for x in w]
)
labels_st = st.lists(st.integers(0, 6), min_size=1, max_size=200)


@FAST
@given(labels=labels_st, fractions=fractions_st, seed=st.integers(0, 2**31))
def test_stratified_split_is_disjoint_complete_proportional_and_seeded(labels, fractions, seed):
    labels = np.asarray(labels)
    parts = stratified_split(labels, fractions, seed)
    assert len(parts) == len(fractions)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    k = len(fractions)
    for cls in np.unique(labels):
        n = int((labels == cls).sum())
        counts = np.array([(labels[p] == cls).sum() for p in parts])
        target = n * np.asarray(fractions)
        if n >= k:
            assert (counts >= 1).all(), (n, counts)  # every class in every part
        if n < k or (target >= 1).all():  # no part had to be topped up to 1: within 1 per class
            assert (np.abs(counts - target) < 1 + 1e-9).all(), (counts, target)
    again = stratified_split(labels, fractions, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@FAST
@given(labels=labels_st, val=st.floats(0.05, 0.5), seed=st.integers(0, 2**31))
def test_carve_val_is_a_seeded_disjoint_complete_split(labels, val, seed):
    train, held = carve_val(labels, val, seed)
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(len(labels)))
    again = carve_val(labels, val, seed)
    assert np.array_equal(train, again[0]) and np.array_equal(held, again[1])


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split([0, 1], [0.5, 0.6], 0)
    with pytest.raises(ValueError, match=">= 0"):
        stratified_split([0, 1], [1.5, -0.5], 0)


# --- transforms --------------------------------------------------------------------------------
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "LA"]
FORMAT = {"1": "PNG", "L": "PNG", "P": "PNG", "RGB": "PNG", "RGBA": "PNG", "CMYK": "JPEG",
          "I": "TIFF", "I;16": "PNG", "F": "TIFF", "LA": "PNG"}  # fmt: skip


@FILES
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 48),
    height=st.integers(1, 48),
    size=st.integers(1, 40),
    augment=st.sampled_from(["none", "basic", "strong"]),
    crop_pct=st.floats(0.5, 1.0),
)
def test_any_image_mode_and_size_gives_the_configured_tensor(
    tmp_path, mode, width, height, size, augment, crop_pct
):
    rng = np.random.default_rng(width * 100 + height)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).convert(mode)
    path = tmp_path / f"img.{FORMAT[mode].lower()}"
    image.save(path, FORMAT[mode])
    cfg = DataConfig(input_size=size, crop_pct=crop_pct)
    rgb = load_rgb(path)
    for transform in (eval_transform(cfg, size), train_transform(cfg, size, augment)):
        out = transform(rgb)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


# --- random bytes to the loader ----------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def _valid_prefix(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


HEADERS = {
    "none": b"",
    "jpeg_soi": b"\xff\xd8\xff\xe0",
    "png_magic": b"\x89PNG\r\n\x1a\n",
    "png_ihdr": _png_header(16, 16),
    "png_huge_ihdr": _png_header(60000, 60000),
    "gif": b"GIF89a",
    "bmp": b"BM",
    "jpeg_prefix": _valid_prefix("JPEG")[:40],
    "png_prefix": _valid_prefix("PNG")[:50],
}


@FILES
@given(
    header=st.sampled_from(sorted(HEADERS)),
    body=st.binary(max_size=600),
    ext=st.sampled_from([".jpg", ".png"]),
)
def test_random_bytes_are_a_clean_skip_never_a_crash(tmp_path, header, body, ext):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one file per example (tmp_path is shared)
    path = folder / f"fuzz{ext}"
    path.write_bytes(HEADERS[header] + body)
    dataset = ImageFilesDataset(folder, transform=eval_transform(DataConfig(input_size=8), 8))
    item = dataset[0]  # must not raise, whatever the bytes
    if isinstance(item, FailedSample):
        assert item.path == str(path) and item.reason.split(" ")[0] in ("undecodable", "truncated")
    else:
        assert item[0].shape == (3, 8, 8)
    reason = check_image(path, path.stat().st_size, load_rgb)  # the scan's verdict agrees
    assert (reason is None) == (not isinstance(item, FailedSample))
