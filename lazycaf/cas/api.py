"""The CAS interface, and opening a backend: a local directory (``lazycaf.cas.local``),
the HTTP CAS (``lazycaf.cas.http``) or an S3 bucket (``lazycaf.cas.s3``).

``open_cas(spec)`` picks the backend: an ``http(s)://`` URL is the project's HTTP CAS server,
``s3://BUCKET[/PREFIX]`` a bucket reached directly (endpoint and credentials from the AWS_*
environment variables), anything else a local directory (default ``~/.cache/lazycaf/cas``,
or ``$LAZYCAF_CAS``).
Every backend verifies what it returns: ``get`` never yields bytes that do not hash to the
digest asked for, and stores only what verifies: ``put``/``put_many`` of bytes that do not
hash to their digest raise an ``IntegrityError`` and never store them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import trio

from lazycaf.cas.gc import StoredBlob
from lazycaf.cas.local import LocalCAS
from lazycaf.cas.refs import ANY, Expected
from lazycaf.cas.tokens import read_token_file
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    UsageError,
)
from lazycaf.core.manifest import Manifest

__all__ = ["CAS", "default_cas_spec", "load_manifest", "open_cas", "resolve"]


class CAS(Protocol):
    """A content-addressed blob store plus named refs."""

    where: str

    async def has(self, digest: Digest) -> bool: ...
    async def find_missing(self, digests: Sequence[Digest]) -> set[Digest]: ...
    async def get(self, digest: Digest) -> bytes: ...
    async def get_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]: ...
    async def put(self, digest: Digest, data: bytes) -> bool: ...
    async def put_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        """Store a batch of blobs; returns how many were new (repeats count once).

        A blob that does not match its digest raises an ``IntegrityError`` and is never
        stored; whether the batch's other blobs are stored then depends on the backend
        (``LocalCAS`` verifies the whole batch first and stores none of it; ``HttpCAS`` sends
        blobs concurrently, so some may land, each whole). Cheaper than one ``put`` per blob:
        the batch shares one durable commit.
        """
        ...

    async def get_many_encoded(
        self, digests: Sequence[Digest]
    ) -> dict[Digest, tuple[framing.Encoding, bytes]]:
        """Stored representations of several blobs in one request (not verified); blobs the
        store lacks are absent from the result."""
        ...

    async def get_ref(self, name: str) -> Digest: ...
    async def set_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        """Point ref ``name`` at ``digest`` (a stored blob). With ``expected`` (a digest, or
        None: no such ref yet), only if the ref still holds it; else ``RefMoved``."""
        ...

    async def read_refs(self, prefix: str = "") -> dict[str, Digest]:
        """Every ref whose name starts with ``prefix`` and the digest it names."""
        ...

    # What the store GC (``lazycaf.cas.gc``) needs; ``HttpCAS`` refuses these but
    # ``list_refs`` with a ``UsageError``: the GC runs against the store itself.
    async def list_blobs(self) -> list[StoredBlob]:
        """Every stored blob: digest, size at rest, when it was stored."""
        ...

    async def delete_blobs(self, digests: Sequence[Digest]) -> int:
        """Delete these blobs (absent ones are skipped); returns how many were there."""
        ...

    async def list_refs(self) -> list[str]:
        """The names of every ref, sorted."""
        ...

    async def delete_ref(self, name: str) -> None:
        """Remove ref ``name`` (``RefNotFound`` if there is none); its blobs stay."""
        ...

    async def aclose(self) -> None: ...


def default_cas_spec() -> str:
    return os.environ.get("LAZYCAF_CAS") or str(Path.home() / ".cache" / "lazycaf" / "cas")


def open_cas(
    spec: str | None = None, *, token: str | None = None, cacert: Path | None = None
) -> CAS:
    """Open the CAS named by ``spec`` (URL or directory; None means the default).
    ``cacert``: the CA bundle an ``https://`` server's certificate must chain to (default:
    ``$SSL_CERT_FILE`` or the system's store, ``lazycaf.cas.tls``)."""
    spec = spec or default_cas_spec()
    # each backend's client library is imported only when it is used: httpx alone is a
    # fifth of the start-up of a command on a local CAS (``lazycaf ls``)
    if spec.startswith(("http://", "https://")):
        from lazycaf.cas.http import HttpCAS

        token = token if token is not None else _token_from_env()
        return HttpCAS(spec, token=token, cacert=cacert)
    if spec.startswith("s3://"):
        from lazycaf.cas.s3 import S3CAS

        return S3CAS(spec)
    if "://" in spec:
        raise UsageError(
            f"unsupported CAS address {spec!r} (use http(s)://…, s3://BUCKET/PREFIX or a directory)"
        )
    return LocalCAS(spec)


def _token_from_env() -> str | None:
    if token := os.environ.get("LAZYCAF_CAS_TOKEN"):
        return token
    if path := os.environ.get("LAZYCAF_CAS_TOKEN_FILE"):
        return read_token_file(Path(path), "LAZYCAF_CAS_TOKEN_FILE")
    return None


async def resolve(cas: CAS, ref: str) -> Digest:
    """A manifest digest from a ref: 64 hex characters are a digest, anything else a name."""
    if Digest.is_hex(ref):
        return Digest.parse(ref)
    return await cas.get_ref(ref)


async def load_manifest(cas: CAS, ref: str) -> tuple[Digest, Manifest]:
    """Resolve ``ref`` and fetch, verify and decode its manifest."""
    digest = await resolve(cas, ref)
    data = await cas.get(digest)
    name = f"manifest {digest}" + (f" (ref {ref!r})" if ref != digest.hex else "")
    manifest = await trio.to_thread.run_sync(functools.partial(Manifest.decode, data, name=name))
    return digest, manifest
