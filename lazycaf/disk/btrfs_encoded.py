"""Writing a blob's zstd frames into a file on Btrfs as compressed extents, as they are.

``BTRFS_IOC_ENCODED_WRITE`` (Linux >= 5.18, CAP_SYS_ADMIN) stores caller-compressed data as
one compressed extent, skipping the compression Btrfs would otherwise run at writeback. A
Btrfs zstd extent is one standard zstd frame of at most 128 KiB of data with a window of at
most 128 KiB: exactly the frames of ``lazycaf.core.framing``, so a cache can store a blob that the
CAS sent as zstd frames without recompressing it.

The kernel does not check the payload: a frame that does not decode writes fine and then reads
back as EIO. Callers must decode and verify the blob before they write its frames, and write
only frames ``framing`` parsed (whole, declaring their size, window <= 128 KiB).

What the kernel accepts, and what this module therefore asks of an extent: a file offset
aligned to the sector size; a length aligned too unless the extent ends the file; at most
128 KiB of data; compressed bytes fewer than the data. Beyond that, a frame is written as
an extent only when Btrfs itself would have kept it compressed: when it saves at least one
sector on disk (or the whole file is smaller than a sector, which Btrfs may store inline).
Any other frame, and every frame where the ioctl is refused, is written as its decoded bytes
with ``pwrite`` (which Btrfs then compresses itself, or not, as for any write).

Refusals: ENOTTY (not Btrfs, or a kernel without the ioctl), EPERM (no CAP_SYS_ADMIN),
EOPNOTSUPP and EACCES (a security module) mean the file cannot take encoded writes at all
(``write_frames`` stops trying for that file and reports it); EINVAL means this one extent
was refused (a ``chattr +C`` file, a layout this kernel rejects) and only that extent falls
back. Other errors (ENOSPC, EIO) are raised as they are. Sync code: call it from a worker
thread. Known limit: the argument struct is laid out for 64-bit userspace; elsewhere its size,
and so the ioctl number, differ and the kernel answers ENOTTY (plain writes).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from lazycaf.core import framing

__all__ = [
    "BTRFS_IOC_ENCODED_WRITE",
    "COMPRESSION_ZSTD",
    "MAX_EXTENT_DATA",
    "Frame",
    "WriteResult",
    "encoded_write",
    "extent_fits",
    "frames_of",
    "write_frames",
]

# struct btrfs_ioctl_encoded_io_args (include/uapi/linux/btrfs.h): iov, iovcnt, offset,
# flags, len, unencoded_len, unencoded_offset, compression, encryption, reserved[64].
_ARGS: Final = struct.Struct("@PLqQQQQII64x")
_IOVEC: Final = struct.Struct("@PN")  # iov_base, iov_len
# _IOW(BTRFS_IOCTL_MAGIC 0x94, 64, struct btrfs_ioctl_encoded_io_args), a 128-byte struct
BTRFS_IOC_ENCODED_WRITE: Final = (1 << 30) | (_ARGS.size << 16) | (0x94 << 8) | 64
COMPRESSION_ZSTD: Final = 2  # BTRFS_ENCODED_IO_COMPRESSION_ZSTD
MAX_EXTENT_DATA: Final = 128 << 10  # BTRFS_MAX_UNCOMPRESSED
_FILE_REFUSES: Final = frozenset({errno.ENOTTY, errno.EPERM, errno.EOPNOTSUPP, errno.EACCES})
_EXTENT_REFUSED: Final = frozenset({errno.EINVAL})


@dataclass(frozen=True)
class Frame:
    """One zstd frame of a payload: ``payload[start:end]`` decodes to ``size`` bytes."""

    start: int
    end: int
    size: int


@dataclass(frozen=True)
class WriteResult:
    """What ``write_frames`` did: extents written encoded, ranges written plain (bytes of
    data), and whether the file refused encoded writes altogether (``refused_errno``)."""

    encoded: int
    encoded_bytes: int
    plain_bytes: int
    refused_errno: int | None = None


def frames_of(payload: bytes) -> list[Frame]:
    """The frames of a zstd payload of ``lazycaf.core.framing`` (which this reads with framing's
    own header parser: whole frames that declare their size, windows <= 128 KiB). Raises
    ``IntegrityError`` on anything else; decode the payload first, it must have decoded."""
    return [Frame(*f) for f in framing.frames(memoryview(payload))]


def _address(buf: bytes) -> int:
    """The address of a bytes object's data (valid while ``buf`` is alive; no copy)."""
    addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    assert addr is not None
    return addr


def encoded_write(fd: int, payload: bytes, frame: Frame, offset: int) -> None:
    """One ``BTRFS_IOC_ENCODED_WRITE``: ``payload[frame.start:frame.end]``, a zstd frame of
    ``frame.size`` bytes of data, becomes the compressed extent at ``offset`` of ``fd``.
    Raises OSError as the kernel refused it (see the module docstring)."""
    iov = bytearray(_IOVEC.pack(_address(payload) + frame.start, frame.end - frame.start))
    iov_addr = ctypes.addressof(ctypes.c_char.from_buffer(iov))
    args = bytearray(
        _ARGS.pack(iov_addr, 1, offset, 0, frame.size, frame.size, 0, COMPRESSION_ZSTD, 0)
    )
    stored = frame.end - frame.start
    written = fcntl.ioctl(fd, BTRFS_IOC_ENCODED_WRITE, args, True)
    if written != stored:  # the kernel takes all of an extent's bytes or fails
        raise OSError(errno.EIO, f"encoded write of {stored} bytes returned {written}")


def extent_fits(frame: Frame, offset: int, file_size: int, sector: int) -> bool:
    """Whether ``frame`` at ``offset`` is an extent Btrfs takes and would itself keep
    compressed: aligned, at most 128 KiB of data, and saving at least one sector (or the
    whole file, smaller than a sector, which Btrfs may keep inline)."""
    stored = frame.end - frame.start
    if not 0 < frame.size <= MAX_EXTENT_DATA or stored >= frame.size or offset % sector:
        return False
    end = offset + frame.size
    if end != file_size and end % sector:
        return False
    if file_size < sector:
        return True
    return -(-stored // sector) < -(-frame.size // sector)


def write_frames(
    fd: int, payload: bytes, frames: Sequence[Frame], data: bytes, *, sector: int
) -> WriteResult:
    """Write a blob into the empty file ``fd``: each frame that fits as a compressed extent,
    the rest as the matching slice of ``data`` (the blob decoded, already verified).

    Once the file refuses encoded writes, the rest of the blob is written plain and
    ``refused_errno`` says why; a caller can then stop trying on that filesystem.
    """
    if sum(f.size for f in frames) != len(data):
        raise ValueError(f"frames hold {sum(f.size for f in frames)} bytes, the blob {len(data)}")
    view = memoryview(data)
    encoded = encoded_bytes = plain = 0
    refused: int | None = None
    offset = 0
    for frame in frames:
        done = False
        if refused is None and extent_fits(frame, offset, len(data), sector):
            try:
                encoded_write(fd, payload, frame, offset)
                done = True
            except OSError as exc:
                if exc.errno in _FILE_REFUSES:
                    refused = exc.errno
                elif exc.errno not in _EXTENT_REFUSED:
                    raise
        if done:
            encoded += 1
            encoded_bytes += frame.size
        else:
            _pwrite_all(fd, view[offset : offset + frame.size], offset)
            plain += frame.size
        offset += frame.size
    return WriteResult(encoded, encoded_bytes, plain, refused)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
