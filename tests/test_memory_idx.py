"""memory.idx: the IDX codec round-trips arrays, gzipped or not, and names broken files."""
import gzip

import numpy as np
import pytest

from memory.idx import parse_idx, read_idx, write_idx


@pytest.mark.parametrize("name", ["t-images-idx3-ubyte", "t-images-idx3-ubyte.gz"])
def test_round_trip(tmp_path, name):
    a = np.random.default_rng(0).integers(0, 256, (5, 3, 2), dtype=np.uint8)
    write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / name)), a)
    raw = (tmp_path / name).read_bytes()
    raw = gzip.decompress(raw) if name.endswith(".gz") else raw
    assert raw[:8] == bytes([0, 0, 8, 3, 0, 0, 0, 5])  # magic: unsigned bytes, 3 dims; first dim 5


def test_broken_files_are_named():
    with pytest.raises(ValueError, match="x.idx is not an unsigned-byte IDX file"):
        parse_idx(bytes([0, 0, 9, 1, 0, 0, 0, 1, 7]), "x.idx")
    with pytest.raises(ValueError, match=r"truncated: header says \(4,\), body has 3 bytes"):
        parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3]))
