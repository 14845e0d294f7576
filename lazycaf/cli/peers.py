"""The CLI command about peers: ``lazycaf affinity REF --peers ...``.

Asks every peer daemon's ``GET /v1/coverage/{manifest}`` at once and ranks the hosts by how
much of the executable's hot set they hold (then by all of its bytes), for a scheduler that
wants the warmest host. A peer that does not answer is listed last with its error; the exit
status is 0 when at least one peer answered.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import trio

from fetcher.peers.peerset import check_address, parse_peer_list
from lazycaf.cas.api import open_cas, resolve
from lazycaf.cas.refs import profile_name_for
from lazycaf.cli.tokens import read_token
from lazycaf.core.errors import Unavailable, UsageError
from lazycaf.core.sizes import format_size

__all__ = ["affinity"]


def _addresses(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read peer list {path}: {exc}") from exc
        found = parse_peer_list(text, where=str(path))
    else:
        found = list(dict.fromkeys(check_address(a) for a in spec.split(",") if a.strip()))
    if not found:
        raise UsageError(f"--peers {spec!r} names no peer")
    return found


async def _ask(
    client: httpx.AsyncClient, address: str, path: str, params: dict[str, str]
) -> dict[str, Any]:
    try:
        r = await client.get(f"http://{address}{path}", params=params)
    except httpx.HTTPError as exc:
        return {"peer": address, "error": f"{type(exc).__name__}: {exc}".strip(": ")}
    if r.status_code != 200:
        return {"peer": address, "error": f"HTTP {r.status_code} {r.text.strip()[:200]}"}
    try:
        answer: dict[str, Any] = r.json()
    except ValueError:
        return {"peer": address, "error": "answer is not JSON"}
    return {"peer": address, **answer}


def _rank_key(row: dict[str, Any]) -> tuple[int, int, int]:
    if "error" in row:
        return (1, 0, 0)
    return (0, -int(row.get("hot_held_bytes", 0)), -int(row.get("held_bytes", 0)))


def _held(part: int, whole: int) -> str:
    share = f"{100 * part / whole:5.1f}%" if whole else "    -"
    return f"{format_size(part)} {share}"


async def affinity(args: argparse.Namespace) -> int:
    addresses = _addresses(args.peers)
    token = read_token(args.token_file) if args.token_file else None
    cas = open_cas(args.cas, cacert=args.cacert)
    try:
        digest = await resolve(cas, args.ref)
    finally:
        await cas.aclose()
    profile = args.profile or profile_name_for(args.ref)
    params = {"profile": profile} if profile else {}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout) as client:

        async def one(address: str) -> None:
            rows.append(await _ask(client, address, f"/v1/coverage/{digest.hex}", params))

        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(one, address)
    rows.sort(key=_rank_key)
    if args.json:
        print(json.dumps({"manifest": digest.hex, "profile": profile, "peers": rows}))
    else:
        print(f"executable {digest}" + (f", profile {profile}" if profile else ""))
        print(f"{'peer':24s} {'hot held':>18s} {'all held':>20s}")
        for row in rows:
            if "error" in row:
                print(f"{row['peer']:24s} unreachable: {row['error']}")
                continue
            hot = _held(row["hot_held_bytes"], row["hot_bytes"])
            held = _held(row["held_bytes"], row["bytes"])
            print(f"{row['peer']:24s} {hot:>18s} {held:>20s}")
    if all("error" in row for row in rows):
        raise Unavailable(f"no peer answered ({', '.join(addresses)})")
    return 0
