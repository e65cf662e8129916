"""ldm/files.py: atomic writes (a failure leaves the old file; the new file gets normal permissions) and
file_sha256."""

import hashlib
import os
import stat

import pytest

from ldm.files import atomic_path, file_sha256


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_written_files_get_the_permissions_of_open_not_mkstemp(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"abc")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644
    assert file_sha256(tmp_path / "new.bin") == hashlib.sha256(b"abc").hexdigest()
