"""PFM reading and writing: byte order, row order, channels, malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill3r.data.pfm import read_pfm, write_pfm


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_round_trip(tmp_path, little_endian, shape):
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / "x.pfm"
    write_pfm(path, values, little_endian=little_endian)
    header = path.read_bytes()[:20].split(b"\n")
    assert header[0] == (b"Pf" if len(shape) == 2 else b"PF")
    assert header[1] == b"%d %d" % (shape[1], shape[0])
    assert float(header[2]) < 0 if little_endian else float(header[2]) > 0
    back = read_pfm(path)
    assert back.dtype == np.float32 and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def test_rows_are_stored_bottom_to_top_in_the_header_byte_order(tmp_path):
    # a hand-written big-endian file: the first stored row is the image's last row
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)  # 3 rows, 2 columns
    body = rows[::-1].astype(">f4").tobytes()
    path = tmp_path / "big.pfm"
    path.write_bytes(b"Pf\n2 3\n1.000000\n" + body)
    np.testing.assert_array_equal(read_pfm(path), rows)
    path.write_bytes(b"Pf\r\n2 3\r\n-1.0\r\n" + rows[::-1].astype("<f4").tobytes())
    np.testing.assert_array_equal(read_pfm(path), rows)  # CRLF header, little-endian


@pytest.mark.parametrize("content, message", [
    (b"P6\n2 3\n-1\n" + bytes(24), "not a PFM file"),
    (b"Pf\n2 x\n-1\n" + bytes(24), "malformed PFM header"),
    (b"Pf\n2 3\n0\n" + bytes(24), "malformed PFM header"),
    (b"Pf\n2 3\n-1\n" + bytes(20), "needs 24"),
    (b"PF\n2 3\n-1\n" + bytes(24), "needs 72"),
    (b"", "not a PFM file"),
])
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.pfm"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_pfm(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="not found"):
        read_pfm(tmp_path / "missing.pfm")


def test_read_errors_become_value_errors_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "io_error.pfm"
    write_pfm(path, np.ones((2, 3), np.float32))

    def fail(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", fail)
    with pytest.raises(ValueError, match="unreadable PFM file") as info:
        read_pfm(path)
    assert str(path) in str(info.value)
