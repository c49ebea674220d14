"""Report files: written whole or not at all, checked before a run, never lost at its end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conformance.harness import files


def test_write_atomic_replaces_the_target_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    files.write_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_leaves_the_earlier_report_untouched(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        files.write_atomic(target, "half \ud800 written")  # fails after the temporary file was created
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_refuses_a_folder_that_takes_no_file_and_keeps_an_existing_report(tmp_path: Path) -> None:
    # /proc/self exists and (as root) passes os.access(W_OK), but no file can be created in it
    msg = files.check_writable("/proc/self/report.json", "--report")
    assert msg is not None and msg.startswith("--report /proc/self/report.json: ") and "choose another path" in msg
    existing = tmp_path / "r.json"
    existing.write_text("earlier report")
    assert files.check_writable(str(existing), "--report") is None
    assert existing.read_text() == "earlier report" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_names_a_directory_and_creates_a_missing_folder(tmp_path: Path) -> None:
    assert files.check_writable(str(tmp_path), "--markdown") == f"--markdown {tmp_path} is a directory; give a file name"
    assert files.check_writable(str(tmp_path / "new" / "r.md"), "--markdown") is None
    assert (tmp_path / "new").is_dir()


def test_a_write_that_fails_at_the_end_goes_to_a_fallback_file(tmp_path: Path) -> None:
    gone = tmp_path / "removed-since-the-check" / "r.json"
    where, warning = files.write_with_fallback(str(gone), '{"report": 1}')
    try:
        assert where != str(gone) and Path(where).read_text() == '{"report": 1}'
        assert warning == f"could not write {gone} (No such file or directory); wrote it to {where} instead"
    finally:
        os.unlink(where)
