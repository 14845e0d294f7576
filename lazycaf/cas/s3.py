"""The S3 CAS: blobs and refs in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO, SeaweedFS).

``s3://BUCKET[/PREFIX]``; the endpoint, region and credentials come from the standard AWS
environment variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), read by the client library (``obstore``, Rust ``object_store``).

Layout under the prefix:

- ``blobs/<hex[:2]>/<hex>``: one object per blob, its bytes as ``framing.encode`` gives them
  (zstd frames, or raw when they do not shrink), the encoding in the object's standard
  ``Content-Encoding`` (``zstd``; absent for raw). In the metadata, not the key, so a blob has
  exactly one name: ``has`` and ``find_missing`` are one HEAD per digest (a key suffix would
  need two), and a frontend can pass the header on as the HTTP CAS's own ``Content-Encoding``.
- ``refs/<name>``: the 64 hex digits of the digest the ref names.

Invariants: a blob object is written only after its bytes verified here (the store never
sees unverified bytes under a blob's name), with ``If-None-Match: *`` so an existing blob is
never replaced by other bytes (only PUT back as it is, to refresh it: below); every blob read
is verified (``verify_blob``). A ref update with an ``expected`` value is a compare-and-swap
done by the store (``If-None-Match: *`` to create, ``If-Match: <ETag of the GET>`` to
replace); a 412 is ``RefMoved``, never a lost update.

Reuse refreshes, opt-in: with ``$LAZYCAF_S3_REFRESH_AFTER`` seconds set (``refresh_after``),
``find_missing`` HEADs each digest (as does a ``put`` of a blob already there) and a present
blob whose ``LastModified`` is older than that is read and PUT back,
same bytes and encoding, ``If-Match`` its ETag, so the store GC counts its age from this use
(``lazycaf.cas.gc``). Not a copy onto itself: AWS S3 refuses one that changes no metadata.
A failed condition (deleted or re-written meanwhile) reports the blob missing and the pack
uploads it (``If-None-Match: *``): either way it ends up young. The GC on such a store needs
a grace of at least ``min_grace``, twice ``refresh_after``. Off by default: a refresh moves a
blob's bytes twice, so a daily re-pack of a mostly unchanged tree would re-transfer every
blob older than the threshold; without it, a blob that was garbage past the grace and is
reused by a pack running during a GC can be lost (see ``lazycaf.cas.gc``).

Known limits: ``p`` and ``p/x`` cannot both be refs (as in ``CasDir``); the check is a LIST
and HEADs before the PUT, so two writers creating such a pair at the same instant can both
succeed. obstore's calls are synchronous; they run in worker threads (``_limiter``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

import obstore
import trio
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from lazycaf.cas.gc import StoredBlob
from lazycaf.cas.refs import ANY, Expected, check_ref_name
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    AccessDenied,
    BlobNotFound,
    CasUnavailable,
    IntegrityError,
    LazyCafError,
    RefMoved,
    RefNotFound,
    UsageError,
    first_error,
)
from lazycaf.core.verified import verify_blob

__all__ = [
    "LIST_FACTOR",
    "LIST_MIN",
    "REQUESTS_IN_FLIGHT",
    "S3CAS",
    "S3_REFRESH_AFTER",
    "parse_s3_url",
]

#: Requests one ``S3CAS`` keeps in flight (each holds a worker thread while it waits).
REQUESTS_IN_FLIGHT: Final = 32
#: ``find_missing`` of more digests than this may LIST shards instead of HEADing each ...
LIST_MIN: Final = 1000
#: ... when the store holds fewer than this many times as many blobs as the query names.
LIST_FACTOR: Final = 100

#: A blob ``find_missing`` finds present and older than this (seconds) is re-written, so its
#: age restarts; the store GC's grace must be at least twice this (module docstring).
S3_REFRESH_AFTER: Final = math.inf  # no refresh unless REFRESH_AFTER_ENV says otherwise
#: Overrides ``S3_REFRESH_AFTER`` (seconds), for packs and GC alike.
REFRESH_AFTER_ENV: Final = "LAZYCAF_S3_REFRESH_AFTER"

# obstore raises a missing object as its NotFoundError or, from get and head, as the
# builtin FileNotFoundError
_NOT_FOUND: Final = (NotFoundError, FileNotFoundError)

T = TypeVar("T")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at either end)."""
    if not url.startswith("s3://"):
        raise UsageError(f"not an s3:// address: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "//" in prefix:
        raise UsageError(f"invalid S3 address {url!r} (use s3://BUCKET[/PREFIX])")
    return bucket, prefix


class S3CAS:
    """The ``CAS`` interface on an S3 bucket and prefix (see the module docstring).

    Holds no state beyond a connection pool: any number of clients and frontends may share a
    bucket. Store failures become ``CasUnavailable`` naming ``where``; refusals of the
    credentials ``AccessDenied``.
    """

    def __init__(
        self,
        url: str,
        *,
        config: Mapping[str, str] | None = None,
        requests_in_flight: int = REQUESTS_IN_FLIGHT,
        refresh_after: float | None = None,
    ) -> None:
        """``config``: S3 settings that override the environment's (``endpoint``,
        ``region``, ``access_key_id``, ``secret_access_key``: obstore's ``S3Config`` keys).
        ``refresh_after``: seconds (default ``$LAZYCAF_S3_REFRESH_AFTER``, else
        ``S3_REFRESH_AFTER``)."""
        bucket, prefix = parse_s3_url(url)
        self.where = url.rstrip("/")
        self.refresh_after = _refresh_after() if refresh_after is None else refresh_after
        self._limiter = trio.CapacityLimiter(requests_in_flight)
        try:
            # Endpoint, region and credentials: from AWS_* in the environment unless given.
            self._store = S3Store(
                bucket,
                prefix=prefix or None,
                config=dict(config or {}),  # type: ignore[arg-type]
                client_options={"allow_http": True, "timeout": "60s", "connect_timeout": "5s"},
            )
        except BaseError as exc:
            raise CasUnavailable(self.where, f"{type(exc).__name__}: {exc}") from exc

    @property
    def min_grace(self) -> float:
        """The shortest grace the store GC accepts here: twice ``refresh_after`` (0 when
        reused blobs are not refreshed: no grace makes a reuse safe then)."""
        return 0.0 if math.isinf(self.refresh_after) else 2 * self.refresh_after

    # -- plumbing ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run one obstore call in a worker thread; map its failures (not NotFound and the
        precondition errors, which the callers turn into what they mean)."""
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, self._store, *args, **kwargs), limiter=self._limiter
            )
        except (*_NOT_FOUND, AlreadyExistsError, PreconditionError):
            raise
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise AccessDenied(f"CAS {self.where} refused the request: {exc}") from exc
        except BaseError as exc:
            raise CasUnavailable(self.where, f"{type(exc).__name__}: {_first_line(exc)}") from exc

    @staticmethod
    def _blob_key(digest: Digest) -> str:
        return f"blobs/{digest.hex[:2]}/{digest.hex}"

    @staticmethod
    def _ref_key(name: str) -> str:
        return f"refs/{name}"

    # -- blobs ------------------------------------------------------------------------------
    async def has(self, digest: Digest) -> bool:
        try:
            await self._call(obstore.head, self._blob_key(digest))
        except _NOT_FOUND:
            return False
        return True

    async def find_missing(self, digests: Sequence[Digest]) -> set[Digest]:
        """The digests not stored. A present blob older than ``refresh_after`` is re-written
        (a GET and a conditional PUT) or, when that fails its condition, reported missing
        (module docstring).

        Small queries (and large ones against a store far larger than them) HEAD each
        distinct digest, ``requests_in_flight`` at a time; a query of more than ``LIST_MIN``
        digests against a store of fewer than ``LIST_FACTOR`` times as many blobs (estimated
        from one shard) LISTs the ``blobs/<xx>/`` shards it touches instead: measured on a
        local SeaweedFS, 4,000 digests took 1.7-2.3 s of HEADs and 0.1-0.4 s of LISTs."""
        unique = list(dict.fromkeys(digests))
        if len(unique) > LIST_MIN:
            shards = sorted({d.hex[:2] for d in unique})
            first = await self._call(_list_shard, f"blobs/{shards[0]}/")
            if len(first) * 256 < LIST_FACTOR * len(unique):
                return await self._missing_by_listing(unique, shards, first)
        missing: set[Digest] = set()

        async def check(d: Digest) -> None:
            if not await self._present_and_fresh(self._blob_key(d)):
                missing.add(d)

        await _run_all(check, unique)
        return missing

    async def _missing_by_listing(
        self, unique: list[Digest], shards: list[str], first: dict[str, float]
    ) -> set[Digest]:
        present = dict(first)

        async def list_one(shard: str) -> None:
            present.update(await self._call(_list_shard, f"blobs/{shard}/"))

        async with trio.open_nursery() as nursery:
            for shard in shards[1:]:
                nursery.start_soon(list_one, shard)
        stale_before = time.time() - self.refresh_after
        missing = {d for d in unique if d.hex not in present}

        async def refresh(d: Digest) -> None:
            try:
                await self._call(_rewrite, self._blob_key(d))
            except (*_NOT_FOUND, PreconditionError, AlreadyExistsError):
                missing.add(d)  # deleted or re-written meanwhile: the pack uploads it

        stale = [d for d in unique if d.hex in present and present[d.hex] < stale_before]
        await _run_all(refresh, stale)
        return missing

    async def _present_and_fresh(self, key: str) -> bool:
        """HEAD ``key``; when it is older than ``refresh_after``, re-write it. False when it
        is absent, or changed or deleted before the re-write (the caller uploads it)."""
        stale_before = time.time() - self.refresh_after
        try:
            meta = await self._call(obstore.head, key)
            if meta["last_modified"].timestamp() < stale_before:
                await self._call(_rewrite, key)
        except (*_NOT_FOUND, PreconditionError, AlreadyExistsError):
            return False
        return True

    async def get_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        try:
            encoding, payload = await self._call(_get_object, self._blob_key(digest))
        except _NOT_FOUND:
            raise BlobNotFound(digest, self.where) from None
        if encoding == framing.ZSTD:
            return framing.ZSTD, payload
        if encoding == framing.IDENTITY:
            return framing.IDENTITY, payload
        raise IntegrityError(f"blob {digest}: unexpected content encoding {encoding!r}")

    async def get(self, digest: Digest) -> bytes:
        encoding, payload = await self.get_encoded(digest)
        verified = await trio.to_thread.run_sync(verify_blob, digest, encoding, payload)
        return verified.data

    async def get_many_encoded(
        self, digests: Sequence[Digest]
    ) -> dict[Digest, tuple[framing.Encoding, bytes]]:
        """One GET per blob, concurrently (S3 has no batch read); absent blobs are left out."""
        out: dict[Digest, tuple[framing.Encoding, bytes]] = {}

        async def one(d: Digest) -> None:
            with contextlib.suppress(BlobNotFound):
                out[d] = await self.get_encoded(d)

        await _run_all(one, list(dict.fromkeys(digests)))
        return out

    async def put(self, digest: Digest, data: bytes) -> bool:
        return await self.put_encoded(digest, framing.IDENTITY, data)

    async def put_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        """Verify the whole batch first (a mismatch stores none of it), then PUT the blobs
        concurrently; returns how many were new."""
        return await self.put_many_encoded([(d, framing.IDENTITY, data) for d, data in items])

    async def _put_all(self, encoded: Mapping[Digest, tuple[framing.Encoding, bytes]]) -> int:
        stored = 0

        async def one(d: Digest) -> None:
            nonlocal stored
            new = await self._put_encoded(d, encoded[d])
            stored += new  # not ``stored += await ...``: that reads ``stored`` first

        await _run_all(one, list(encoded))
        return stored

    async def put_encoded(
        self, digest: Digest, encoding: str, payload: bytes, *, max_size: int = framing.MAX_DECODED
    ) -> bool:
        """Store a blob received encoded (a frontend's PUT): decoded (at most ``max_size``
        bytes) and verified first; kept as ``framing.at_rest`` says (frames as they came when
        canonical, so a well-formed upload is not recompressed). True if new."""
        at_rest = await trio.to_thread.run_sync(
            functools.partial(_verify_at_rest, max_size=max_size), digest, encoding, payload
        )
        return await self._put_encoded(digest, at_rest)

    async def put_many_encoded(
        self, records: Sequence[tuple[Digest, str, bytes]], *, max_size: int = framing.MAX_DECODED
    ) -> int:
        """``put_encoded`` for a batch: every blob verified before any is sent (one that does
        not verify stores none of the batch), then PUT concurrently; returns how many were
        new (repeats count once)."""

        def verify_all() -> dict[Digest, tuple[framing.Encoding, bytes]]:
            out: dict[Digest, tuple[framing.Encoding, bytes]] = {}
            for d, encoding, payload in records:
                at_rest = _verify_at_rest(d, encoding, payload, max_size=max_size)
                out.setdefault(d, at_rest)
            return out

        encoded = await trio.to_thread.run_sync(verify_all)
        return await self._put_all(encoded)

    async def size(self, digest: Digest) -> int:
        """The blob's content size: the object's for a raw blob; for zstd frames, from their
        headers (the object is read: a HEAD does not return its encoding)."""
        encoding, payload = await self.get_encoded(digest)
        what = f"blob {digest}"
        return framing.decoded_size(encoding, payload, what=what)

    async def _put_encoded(self, digest: Digest, encoded: tuple[framing.Encoding, bytes]) -> bool:
        """PUT a verified blob unless it is there (``If-None-Match: *``): True if new."""
        encoding, payload = encoded
        attributes = {"Content-Encoding": encoding} if encoding != framing.IDENTITY else None
        key = self._blob_key(digest)
        for _ in range(2):  # once more when the stored one went before its refresh
            try:
                await self._call(
                    obstore.put,
                    key,
                    payload,
                    attributes=attributes,
                    mode="create",
                    use_multipart=False,
                )
            except (AlreadyExistsError, PreconditionError):
                if await self._present_and_fresh(key):  # reused: refresh it, as find_missing
                    return False
                continue
            return True
        return False

    # -- refs -------------------------------------------------------------------------------
    async def _read_ref(self, name: str) -> tuple[Digest, str] | None:
        """(digest, ETag) of ref ``name``, None when there is none."""
        try:
            meta, body = await self._call(_get_ref_object, self._ref_key(name))
        except _NOT_FOUND:
            return None
        text = body.decode("ascii", "replace").strip()
        if not Digest.is_hex(text):
            raise IntegrityError(f"CAS {self.where}: ref {name!r} holds {text[:80]!r}")
        return Digest.parse(text), meta

    async def get_ref(self, name: str) -> Digest:
        check_ref_name(name)
        found = await self._read_ref(name)
        if found is None:
            raise RefNotFound(name, self.where)
        return found[0]

    async def set_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        check_ref_name(name)
        if not await self.has(digest):
            raise BlobNotFound(digest, f"{self.where} (ref {name!r} must name a stored blob)")
        await self._check_no_conflict(name)
        key, body = self._ref_key(name), digest.hex.encode()
        if expected is ANY:
            await self._call(obstore.put, key, body, use_multipart=False)
            return
        if expected is None:
            try:
                await self._call(obstore.put, key, body, mode="create", use_multipart=False)
            except (AlreadyExistsError, PreconditionError):
                raise RefMoved(name, "no ref", await self._describe(name)) from None
            return
        current = await self._read_ref(name)
        if current is None or current[0] != expected:
            raise RefMoved(name, expected, current[0] if current else "no ref")
        try:
            mode = {"e_tag": current[1]}
            await self._call(obstore.put, key, body, mode=mode, use_multipart=False)
        except (PreconditionError, *_NOT_FOUND):
            raise RefMoved(name, expected, await self._describe(name)) from None

    async def _describe(self, name: str) -> str:
        found = await self._read_ref(name)
        return found[0].hex if found else "no ref"

    async def _check_no_conflict(self, name: str) -> None:
        """Refuse ``name`` when a ref ``name/...`` or a ref that is a parent path of it
        exists (``p`` and ``p/x`` cannot both be refs, as in git)."""
        nested = await self._call(_list_one, f"{self._ref_key(name)}/")
        parts = name.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        conflicts = [f"{name}/{nested[len(self._ref_key(name)) + 1 :]}"] if nested else []
        for parent in parents:
            if await self._read_ref(parent) is not None:
                conflicts.append(parent)
        if conflicts:
            raise UsageError(f"CAS {self.where}: ref {name!r} conflicts with ref {conflicts[0]!r}")

    # -- listing and deletion (the store GC) ------------------------------------------------
    async def list_blobs(self) -> list[StoredBlob]:
        """One LIST of ``blobs/`` (paged by the store); ``mtime`` is ``LastModified``, by
        the server's clock."""
        return await self._call(_list_blobs)

    async def delete_blobs(self, digests: Sequence[Digest]) -> int:
        """Bulk DELETE (DeleteObjects, 1000 keys a request); S3 reports no difference
        between a deleted and an absent key, so the count is of the keys asked for."""
        keys = [self._blob_key(d) for d in dict.fromkeys(digests)]
        if keys:
            await self._call(obstore.delete, keys)
        return len(keys)

    async def list_refs(self) -> list[str]:
        return await self._call(_list_refs)

    async def read_refs(self, prefix: str = "") -> dict[str, Digest]:
        """One LIST of the refs, then a GET of each that starts with ``prefix``,
        concurrently (a ref removed meanwhile is left out)."""
        names = [n for n in await self.list_refs() if n.startswith(prefix)]
        out: dict[str, Digest] = {}

        async def one(name: str) -> None:
            found = await self._read_ref(name)
            if found is not None:
                out[name] = found[0]

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return dict(sorted(out.items()))

    async def delete_ref(self, name: str) -> None:
        """A plain DELETE after a GET that saw the ref: S3 has no conditional DELETE (nor
        obstore a way to send one), so an update racing the rm may be lost to it. That is
        the intent of an rm (this name goes), and the blobs the lost update named stay until
        a GC finds them unreferenced and older than its grace."""
        check_ref_name(name)
        if await self._read_ref(name) is None:
            raise RefNotFound(name, self.where)
        await self._call(obstore.delete, self._ref_key(name))

    async def aclose(self) -> None:
        """Nothing to release: obstore drops its connections with the store object."""


async def _run_all(fn: Callable[[Digest], object], digests: list[Digest]) -> None:
    """``await fn(d)`` for every digest concurrently (the limiter bounds the requests); the
    first failure cancels the rest and is raised as it is, not in an exception group."""
    try:
        async with trio.open_nursery() as nursery:
            for d in digests:
                nursery.start_soon(fn, d)  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        leaf = first_error(group)
        if isinstance(leaf, LazyCafError):
            raise leaf from None
        raise


def _get_object(store: S3Store, key: str) -> tuple[str, bytes]:
    result = obstore.get(store, key)
    encoding = str(result.attributes.get("Content-Encoding") or framing.IDENTITY)
    return encoding, bytes(result.bytes())


def _rewrite(store: S3Store, key: str) -> None:
    """PUT an object's bytes and encoding back under its key, if it is still that object
    (``If-Match`` the ETag of the GET): its ``LastModified`` becomes now."""
    result = obstore.get(store, key)
    etag = result.meta["e_tag"]
    if etag is None:
        raise IntegrityError(f"the store sent no ETag for {key!r}")
    payload = bytes(result.bytes())
    encoding = result.attributes.get("Content-Encoding")
    attributes = {"Content-Encoding": str(encoding)} if encoding else None
    obstore.put(
        store, key, payload, attributes=attributes, mode={"e_tag": etag}, use_multipart=False
    )


def _refresh_after() -> float:
    text = os.environ.get(REFRESH_AFTER_ENV)
    if not text:
        return S3_REFRESH_AFTER
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise UsageError(f"{REFRESH_AFTER_ENV}={text!r} is not a number of seconds >= 0")
    return value


def _get_ref_object(store: S3Store, key: str) -> tuple[str, bytes]:
    result = obstore.get(store, key)
    etag = result.meta["e_tag"]
    if etag is None:  # no ETag, no compare-and-swap: refuse rather than race
        raise IntegrityError(f"the store sent no ETag for {key!r}")
    return etag, bytes(result.bytes())


def _list_shard(store: S3Store, prefix: str) -> dict[str, float]:
    """The blobs under one ``blobs/<xx>/`` shard: hex -> ``LastModified`` (Unix time)."""
    out = {}
    for page in obstore.list(store, prefix):
        for meta in page:
            name = meta["path"].rsplit("/", 1)[-1]
            if Digest.is_hex(name):
                out[name] = meta["last_modified"].timestamp()
    return out


def _list_one(store: S3Store, prefix: str) -> str | None:
    """The first key under ``prefix``, or None."""
    for page in obstore.list(store, prefix, chunk_size=1):
        for meta in page:
            return meta["path"]
    return None


def _list_blobs(store: S3Store) -> list[StoredBlob]:
    out = []
    for page in obstore.list(store, "blobs/"):
        for meta in page:
            name = meta["path"].rsplit("/", 1)[-1]
            if Digest.is_hex(name):  # anything else under blobs/ is not ours: leave it
                mtime = meta["last_modified"].timestamp()
                out.append(StoredBlob(Digest.parse(name), meta["size"], mtime))
    return out


def _list_refs(store: S3Store) -> list[str]:
    out = []
    for page in obstore.list(store, "refs/"):
        for meta in page:
            name = meta["path"].removeprefix("refs/")
            with contextlib.suppress(UsageError):
                out.append(check_ref_name(name))
    return sorted(out)


def _verify_at_rest(
    digest: Digest, encoding: str, payload: bytes, *, max_size: int
) -> tuple[framing.Encoding, bytes]:
    data = framing.decode(encoding, payload, what=f"blob {digest}", max_size=max_size)
    digest.verify(data)
    return framing.at_rest(encoding, payload, data)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else ""
