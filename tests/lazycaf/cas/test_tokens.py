"""Token files (``lazycaf/cas/tokens.py``): read when only the owner can access them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazycaf.cas.tokens import read_token_file
from lazycaf.core.errors import UsageError


def write(tmp_path: Path, content: bytes, mode: int) -> Path:
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_an_owner_only_file_is_read_and_stripped(tmp_path: Path, mode: int) -> None:
    assert read_token_file(write(tmp_path, b"  s3cret \n", mode), "--token-file") == "s3cret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o777])
def test_a_file_group_or_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, b"s3cret\n", mode)
    with pytest.raises(UsageError) as info:
        read_token_file(path, "LAZYCAF_CAS_TOKEN_FILE")
    message = str(info.value)
    assert message.startswith(f"LAZYCAF_CAS_TOKEN_FILE {path} has mode {mode:04o}")
    assert "s3cret" not in message and "\n" not in message


@pytest.mark.parametrize(("content", "needle"), [(b" \n", "is empty"), (b"\xff\xfe", "not UTF-8")])
def test_empty_or_binary_files_are_refused(tmp_path: Path, content: bytes, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        read_token_file(write(tmp_path, content, 0o600), "--token-file")


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot read --peer-token-file .*No such file"):
        read_token_file(tmp_path / "absent", "--peer-token-file")
