"""What a compiled Python module imports when it runs, read from its ``.pyc``.

A run without a profile of its own learns what the import system will read next from the
modules it has read: a ``.pyc``'s module-level code (and its class bodies, which run at
import too) names, in ``IMPORT_NAME`` instructions, every module an ``import`` at the top of
a file loads. Imports inside functions run later or never and are left out, as are those
under ``if TYPE_CHECKING:`` (never true at run time; skipping them took the modules crawled
for ``import torch`` from 2,535 to 1,061 with the same 1,019 of the 1,031 it loads).

Only a ``.pyc`` of this interpreter's version is read (its magic number): bytecode and
``marshal`` change between versions. ``marshal`` is not safe against crafted input, and a
``.pyc`` is the executable's, so untrusted: the mount unmarshals nothing itself. It runs
this module as a worker process (``python -m lazycaf.mount.importscan``) that gives up root
(to ``nobody``) and new privileges and caps its memory, CPU, files and processes before it
reads any input; a bad ``.pyc`` gets no answer, and one that crashes or stalls the worker
ends the crawl (``lazycaf.mount.importcrawl``). Answers are bounded (``MAX_NAME``,
``MAX_PARTS``, ``MAX_FROMLIST``, ``MAX_IMPORTS``) and each code object is walked once.

Worker protocol, on stdin/stdout: each request is a little-endian u32 length and that many
bytes of a ``.pyc``; each answer one JSON line, ``null`` (not this version's, or unreadable)
or ``[[name, [fromlist...], level], ...]`` in the order the code runs them.
"""

from __future__ import annotations

import dis
import importlib.util
import json
import marshal
import os
import sys
import types
from typing import Final

__all__ = ["MAX_PYC", "Import", "module_imports"]

MAX_PYC: Final = 8 << 20  # a larger .pyc is not sent to the worker
MAX_NAME: Final = 256  # a longer module name is not an import anyone resolves
MAX_PARTS: Final = 32  # nor one of more dotted parts
MAX_FROMLIST: Final = 256
MAX_IMPORTS: Final = 4096  # per .pyc
_MAX_CODES: Final = 10_000  # code objects walked per .pyc (marshal shares them: walk each once)
_HEADER: Final = 16  # magic, flags, and the source's mtime and size (or hash)
_CO_OPTIMIZED: Final = 0x1  # a function's code; a module's or class body's has it clear
_MEMORY: Final = 1 << 30  # the worker's address-space cap
_CPU_S: Final = 300  # the worker's CPU-seconds cap (a run's crawl takes well under 1)

Import = tuple[str, tuple[str, ...], int]  # (name, fromlist, level) as IMPORT_NAME gets them

_IMPORT_NAME: Final = dis.opmap["IMPORT_NAME"]
_LOAD_CONST: Final = dis.opmap["LOAD_CONST"]
_EXTENDED_ARG: Final = dis.opmap["EXTENDED_ARG"]
_CACHE: Final = dis.opmap.get("CACHE", -1)
_LOADS_NAME: Final = {dis.opmap[n] for n in ("LOAD_NAME", "LOAD_GLOBAL", "LOAD_ATTR")}
_JUMPS_IF_FALSE: Final = {
    op for name, op in dis.opmap.items() if name.startswith("POP_JUMP") and "IF_FALSE" in name
}
_BACKWARD: Final = {op for name, op in dis.opmap.items() if "BACKWARD" in name}


def _caches(op: int) -> int:
    entries = getattr(dis, "_inline_cache_entries", None)
    if isinstance(entries, dict):  # 3.13: by name
        return int(entries.get(dis.opname[op], 0))
    return int(entries[op]) if entries is not None else 0


def module_imports(pyc: bytes) -> list[Import] | None:
    """The imports the module-level code of ``pyc`` (and its class bodies) runs, in order;
    None when it is not a ``.pyc`` of this interpreter's version. Raises what ``marshal``
    raises on a damaged one (ValueError, EOFError, TypeError)."""
    if len(pyc) < _HEADER or pyc[:4] != importlib.util.MAGIC_NUMBER:
        return None
    code = marshal.loads(memoryview(pyc)[_HEADER:])
    if not isinstance(code, types.CodeType):
        return None
    out: list[Import] = []
    _walk(code, out, depth=0, seen=set())
    return out[:MAX_IMPORTS]


def valid_name(name: object) -> bool:
    """A module name worth resolving: a string, not too long, of few parts, encodable."""
    if not isinstance(name, str) or len(name) > MAX_NAME or name.count(".") >= MAX_PARTS:
        return False
    try:
        name.encode()
    except UnicodeEncodeError:  # a lone surrogate: no file is named so
        return False
    return True


def _walk(code: types.CodeType, out: list[Import], *, depth: int, seen: set[int]) -> None:
    if id(code) in seen or len(seen) >= _MAX_CODES or len(out) >= MAX_IMPORTS:
        return
    seen.add(id(code))
    raw = code.co_code
    names, consts = code.co_names, code.co_consts
    ext = 0
    skip_until = 0
    prev: list[tuple[int, int]] = []  # the last two instructions (op, arg)
    for i in range(0, len(raw), 2):
        op, arg = raw[i], raw[i + 1] | ext
        if op == _EXTENDED_ARG:
            ext = arg << 8
            continue
        ext = 0
        if op == _CACHE:
            continue
        if i < skip_until:
            pass
        elif (
            op in _JUMPS_IF_FALSE
            and op not in _BACKWARD
            and prev
            and _is_type_checking(code, *prev[-1])
        ):
            skip_until = i + 2 + 2 * _caches(op) + 2 * arg  # the block it jumps over
        elif op == _IMPORT_NAME and arg < len(names):
            fromlist: tuple[str, ...] = ()
            level = 0
            if len(prev) == 2 and prev[0][0] == _LOAD_CONST and prev[1][0] == _LOAD_CONST:
                lv, fl = _const(consts, prev[0][1]), _const(consts, prev[1][1])
                level = lv if isinstance(lv, int) and 0 <= lv < 64 else 0
                if isinstance(fl, tuple):
                    fromlist = tuple(x for x in fl[:MAX_FROMLIST] if valid_name(x))
            if valid_name(names[arg]):
                out.append((names[arg], fromlist, level))
        prev = [*prev[-1:], (op, arg)]
    if depth < 8:
        for c in consts:
            if isinstance(c, types.CodeType) and not c.co_flags & _CO_OPTIMIZED:
                _walk(c, out, depth=depth + 1, seen=seen)  # a class body: runs at import


def _const(consts: tuple[object, ...], k: int) -> object:
    return consts[k] if 0 <= k < len(consts) else None


def _is_type_checking(code: types.CodeType, op: int, arg: int) -> bool:
    if op not in _LOADS_NAME:
        return False
    if op == dis.opmap.get("LOAD_GLOBAL") and sys.version_info >= (3, 11):
        arg >>= 1  # the low bit says whether NULL is pushed too
    elif op == dis.opmap.get("LOAD_ATTR") and sys.version_info >= (3, 12):
        arg >>= 1
    return 0 <= arg < len(code.co_names) and code.co_names[arg] == "TYPE_CHECKING"


# -- the worker process --------------------------------------------------------------------
def _confine() -> None:
    """Give up what a crafted .pyc could abuse before reading any: root (to ``nobody``),
    memory beyond ``_MEMORY``, CPU beyond ``_CPU_S``, new processes and privileges, more
    files, the right to write them."""
    import ctypes
    import resource

    ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
        os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY, _MEMORY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (_CPU_S, _CPU_S))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))


def serve(inp: object, out: object) -> None:
    """Answer requests until end of input (see the module's docstring)."""
    read = inp.read  # type: ignore[attr-defined]
    write = out.write  # type: ignore[attr-defined]
    flush = out.flush  # type: ignore[attr-defined]
    while True:
        head = read(4)
        if len(head) < 4:
            return
        n = int.from_bytes(head, "little")
        if n > MAX_PYC:
            return
        data = read(n)
        if len(data) < n:
            return
        try:  # anything a crafted .pyc makes marshal or the walk raise: no answer
            found = module_imports(data)
            answer = None if found is None else [[nm, list(fl), lv] for nm, fl, lv in found]
            line = json.dumps(answer, separators=(",", ":")).encode()
        except Exception:  # SystemError, MemoryError, ...: no answer for this one
            line = b"null"
        write(line + b"\n")
        flush()


def main() -> None:
    _confine()
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
