"""Segment files of the local store are written from reused aligned buffers, straight to
disk where the filesystem allows it, and hold exactly the bytes that were hashed."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from ptutils import codec
from ptutils.errors import StoreError
from ptutils.store import segment_files as sf

BLOCK = sf.WRITE_BLOCK
SIZES = [1, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 7]


def _segment(nbytes: int, seed: int) -> codec.Segment:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    view = memoryview(data).cast("B")
    return codec.Segment(codec.checksum(view), nbytes, view)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_every_size_lands_byte_for_byte(tmp_path, direct):
    """Lengths that are not whole blocks are padded for O_DIRECT and cut back after."""
    files = sf.SegmentFiles(tmp_path)
    files._direct = direct and bool(sf._O_DIRECT)
    segs = [_segment(n, i) for i, n in enumerate(SIZES)]
    assert files.write_missing(segs) == sum(SIZES)
    for seg in segs:
        data = files.path(seg.hash).read_bytes()
        assert len(data) == seg.nbytes and data == seg.view.tobytes()
        assert files.intact(seg.hash, seg.nbytes)
    assert files.syncs <= 2  # one barrier for the data, one for the names
    assert not list(tmp_path.rglob("*.tmp"))


def test_bytes_that_do_not_hash_to_the_name_never_land(tmp_path):
    """The digest is taken of the copy that is written: a State that changed after it was
    encoded fails verification instead of landing under a wrong name."""
    files = sf.SegmentFiles(tmp_path)
    good = _segment(BLOCK + 5, 1)
    data = np.frombuffer(good.view, dtype=np.uint8).copy()
    seg = codec.Segment(good.hash, good.nbytes, memoryview(data).cast("B"))
    data[BLOCK + 2] ^= 1  # changed in the second block, after the name was computed
    with pytest.raises(StoreError, match="failed verification"):
        files.write_missing([seg])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_write_buffers_are_reused_not_reallocated(tmp_path):
    files = sf.SegmentFiles(tmp_path)
    files.write_missing([_segment(BLOCK * 2, 7)])
    kept = {id(b) for b in sf._FREE_BUFFERS}
    assert 1 <= len(kept) <= sf.WRITE_THREADS
    files.write_missing([_segment(BLOCK * 2, 8)])
    assert {id(b) for b in sf._FREE_BUFFERS} == kept


def test_a_filesystem_without_direct_io_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """EINVAL from an O_DIRECT open (as on filesystems without direct I/O) switches the
    writer to buffered writes for good; the segment still lands."""
    real_open = sf.os.open

    def no_direct(path, flags, *args):
        if flags & sf._O_DIRECT:
            raise OSError(sf.errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(sf.os, "open", no_direct)
    files = sf.SegmentFiles(tmp_path)
    files._direct = True
    seg = _segment(sf.DIRECT_MIN + 5, 3)
    files.write_missing([seg])
    assert not files._direct
    assert xxhash.xxh3_128(files.path(seg.hash).read_bytes()).hexdigest() == seg.hash
