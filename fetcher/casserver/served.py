"""The store behind a CAS frontend: a local directory or an S3 bucket, one async interface.

``CasApp`` speaks HTTP; a ``ServedStore`` holds the blobs and refs. Two kinds:

- ``ServedDir``: a ``CasDir`` on local disk, its sync calls in worker threads, blob PUTs made
  durable in groups by a ``GroupCommitter`` (one ``syncfs`` for concurrent uploads), which
  ``run`` hosts for the app's lifespan;
- ``ServedBucket``: an ``S3CAS`` (``s3://BUCKET[/PREFIX]``). It holds no state, so any number
  of frontends may serve one bucket: a blob PUT is verified here and written with
  ``If-None-Match: *``, a ref update with ``If-Match`` / ``If-None-Match`` is a
  compare-and-swap done by the store itself (``lazycaf.cas.s3``).

Both verify every upload before it becomes visible, keep zstd frames as they were sent when
they have the canonical layout (``framing.at_rest``), and raise the project's typed errors
(``NotFound``, ``IntegrityError``, ``RefMoved``, ``CasUnavailable``), which the app turns into
status codes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import trio

from fetcher.casserver.groupcommit import GroupCommitter
from lazycaf.cas.casdir import CasDir, Staged
from lazycaf.cas.refs import ANY, Expected
from lazycaf.cas.s3 import S3CAS
from lazycaf.core.digest import Digest
from lazycaf.core.errors import NotFound, RefNotFound

__all__ = [
    "MAX_UPLOAD",
    "Record",
    "ServedBucket",
    "ServedDir",
    "ServedStore",
    "serve_bucket",
    "serve_dir",
]

Record = tuple[Digest, str, bytes]  # digest, encoding, payload as stored or sent

#: The most an uploaded blob may decode to (the app caps request bodies at the same size).
MAX_UPLOAD: Final = 512 << 20


class ServedStore(Protocol):
    where: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background service, for the app's lifespan (returns when cancelled)."""
        ...

    def commit_rounds(self) -> int:
        """Durable commits run so far (group commits of a directory; 0 for a bucket)."""
        ...

    async def size(self, digest: Digest) -> int: ...
    async def read_encoded(self, digest: Digest) -> tuple[str, bytes]: ...
    async def read_many(self, digests: Sequence[Digest]) -> list[Record]:
        """The stored representations of the blobs present, in the order asked, once each."""
        ...

    async def put_encoded(self, digest: Digest, encoding: str, payload: bytes) -> bool:
        """Verify and store one blob, durable when this returns; True if it is new."""
        ...

    async def put_batch(self, records: Sequence[Record]) -> int:
        """Verify every blob (one bad blob stores none), then store them; how many were new."""
        ...

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]: ...
    async def read_ref(self, name: str) -> Digest: ...
    async def ref_or_none(self, name: str) -> Digest | None: ...
    async def read_refs(self, prefix: str) -> dict[str, Digest]: ...
    async def write_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None: ...
    async def aclose(self) -> None: ...


def serve_dir(root: str | os.PathLike[str]) -> ServedDir:
    """``lazycaf cas serve --root DIR`` (created when absent)."""
    return ServedDir(CasDir(root))


def serve_bucket(url: str, s3_config: Mapping[str, str] | None = None) -> ServedBucket:
    """``lazycaf cas serve --store s3://BUCKET[/PREFIX]``; ``s3_config`` overrides the AWS_*
    environment (``endpoint``, ``region``)."""
    return ServedBucket(S3CAS(url, config=s3_config))


class ServedDir:
    """A CAS directory served: disk work in threads under one limiter, ``blobs:missing``
    queries (up to 100,000 stats, open to anyone) under their own, so a flood of them queues
    behind itself, not in front of blob reads."""

    def __init__(self, store: CasDir, *, max_size: int = MAX_UPLOAD) -> None:
        self.dir = store
        self.where = str(store.root)
        self.committer = GroupCommitter(store)
        self._max_size = max_size
        self._limiter = trio.CapacityLimiter(16)
        self._queries = trio.CapacityLimiter(2)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.committer.run(task_status=task_status)

    def commit_rounds(self) -> int:
        return self.committer.statistics().rounds

    async def size(self, digest: Digest) -> int:
        return int(await self._thread(self.dir.size, digest))

    async def read_encoded(self, digest: Digest) -> tuple[str, bytes]:
        encoding, payload = await self._thread(self.dir.read_encoded, digest)
        return encoding, payload

    async def read_many(self, digests: Sequence[Digest]) -> list[Record]:
        return list(await self._thread(_read_records, self.dir, list(digests)))

    async def put_encoded(self, digest: Digest, encoding: str, payload: bytes) -> bool:
        stage = functools.partial(self.dir.stage_encoded, max_size=self._max_size)
        staged = await self._thread(stage, digest, encoding, payload)
        return staged is not None and await self.committer.commit(staged)

    async def put_batch(self, records: Sequence[Record]) -> int:
        staged = await self._thread(self._stage_all, records)
        return sum(await self._thread(self.dir.publish, staged))

    def _stage_all(self, records: Sequence[Record]) -> list[Staged]:
        staged: list[Staged] = []
        try:
            seen: set[Digest] = set()
            for digest, encoding, payload in records:
                one = self.dir.stage_encoded(digest, encoding, payload, max_size=self._max_size)
                if one is not None and digest not in seen:
                    staged.append(one)
                    seen.add(digest)
                elif one is not None:
                    self.dir.discard([one])
        except BaseException:
            self.dir.discard(staged)
            raise
        return staged

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        missing = await trio.to_thread.run_sync(
            self.dir.find_missing, list(digests), limiter=self._queries
        )
        return list(missing)

    async def read_ref(self, name: str) -> Digest:
        digest: Digest = await self._thread(self.dir.read_ref, name)
        return digest

    async def ref_or_none(self, name: str) -> Digest | None:
        try:
            return await self.read_ref(name)
        except RefNotFound:
            return None

    async def write_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        await self._thread(functools.partial(self.dir.write_ref, expected=expected), name, digest)

    async def read_refs(self, prefix: str) -> dict[str, Digest]:
        refs: dict[str, Digest] = await self._thread(self.dir.read_refs, prefix)
        return refs

    async def aclose(self) -> None:
        """Nothing to release."""


class ServedBucket:
    """An S3 bucket served (``S3CAS`` already runs its calls in worker threads, at most
    ``REQUESTS_IN_FLIGHT`` at a time). No background service, nothing cached: a second
    frontend on the same bucket sees every write of this one as soon as it is answered."""

    def __init__(self, bucket: S3CAS, *, max_size: int = MAX_UPLOAD) -> None:
        self.bucket = bucket
        self.where = bucket.where
        self._max_size = max_size

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def commit_rounds(self) -> int:
        return 0

    async def size(self, digest: Digest) -> int:
        return await self.bucket.size(digest)

    async def read_encoded(self, digest: Digest) -> tuple[str, bytes]:
        return await self.bucket.get_encoded(digest)

    async def read_many(self, digests: Sequence[Digest]) -> list[Record]:
        found = await self.bucket.get_many_encoded(digests)
        return [(d, *found[d]) for d in dict.fromkeys(digests) if d in found]

    async def put_encoded(self, digest: Digest, encoding: str, payload: bytes) -> bool:
        return await self.bucket.put_encoded(digest, encoding, payload, max_size=self._max_size)

    async def put_batch(self, records: Sequence[Record]) -> int:
        return await self.bucket.put_many_encoded(records, max_size=self._max_size)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        missing = await self.bucket.find_missing(digests)
        return [d for d in dict.fromkeys(digests) if d in missing]

    async def read_ref(self, name: str) -> Digest:
        return await self.bucket.get_ref(name)

    async def ref_or_none(self, name: str) -> Digest | None:
        try:
            return await self.bucket.get_ref(name)
        except RefNotFound:
            return None

    async def write_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        await self.bucket.set_ref(name, digest, expected=expected)

    async def read_refs(self, prefix: str) -> dict[str, Digest]:
        return await self.bucket.read_refs(prefix)

    async def aclose(self) -> None:
        await self.bucket.aclose()


def _read_records(store: CasDir, digests: list[Digest]) -> list[Record]:
    out: list[Record] = []
    for d in dict.fromkeys(digests):
        with contextlib.suppress(NotFound):
            encoding, payload = store.read_encoded(d)
            out.append((d, encoding, payload))
    return out
