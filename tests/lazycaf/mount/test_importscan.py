"""What a .pyc imports when it runs (``lazycaf.mount.importscan``), in process and through
the worker process the mount runs it in."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lazycaf.mount.importscan import module_imports

SOURCE = textwrap.dedent(
    """
    import os, json.decoder
    from . import sibling
    from ..up import thing as alias
    from typing import TYPE_CHECKING
    try:
        import optional_speedup
    except ImportError:
        optional_speedup = None
    if TYPE_CHECKING:
        import only_for_typing
        from heavy import Types
    import after_the_block

    def later():
        import inside_a_function

    class Config:
        import inside_a_class_body
        def method(self):
            import inside_a_method
    """
)


def pyc_of(source: str) -> bytes:
    code = compile(source, "mod.py", "exec")
    return importlib._bootstrap_external._code_to_timestamp_pyc(code, 0, len(source))  # type: ignore[attr-defined]


def test_module_level_imports_in_order_without_functions_or_type_checking() -> None:
    found = module_imports(pyc_of(SOURCE))
    assert found == [
        ("os", (), 0),
        ("json.decoder", (), 0),
        ("", ("sibling",), 1),
        ("up", ("thing",), 2),
        ("typing", ("TYPE_CHECKING",), 0),
        ("optional_speedup", (), 0),
        ("after_the_block", (), 0),
        ("inside_a_class_body", (), 0),  # a class body runs at import
    ]


def test_another_pythons_pyc_or_a_damaged_one() -> None:
    good = pyc_of("import os\n")
    assert module_imports(b"\x00\x01\x02\x03" + good[4:]) is None  # another magic number
    assert module_imports(good[:10]) is None  # shorter than a header
    with pytest.raises((ValueError, EOFError, TypeError)):
        module_imports(good[:16] + b"\xff\x00garbage")
    assert module_imports(good[:16] + b"N") is None  # not a code object


def test_the_worker_answers_each_pyc_and_survives_garbage() -> None:
    with subprocess.Popen(
        [sys.executable, "-I", "-m", "lazycaf.mount.importscan"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            for data, want in (
                (pyc_of("import a.b\nfrom c import d\n"), [["a.b", [], 0], ["c", ["d"], 0]]),
                (b"\x00" * 40, None),  # garbage: null, and the worker goes on
                (pyc_of(SOURCE)[:16] + b"\xff\xff", None),  # a damaged one: the same
                (pyc_of("import e\n"), [["e", [], 0]]),
            ):
                proc.stdin.write(len(data).to_bytes(4, "little") + data)
                proc.stdin.flush()
                assert json.loads(proc.stdout.readline()) == want
            if os.geteuid() == 0:  # it gave up root before reading anything
                with open(f"/proc/{proc.pid}/status") as f:
                    uid = next(line for line in f if line.startswith("Uid:")).split()[1:]
                assert "0" not in uid, uid
            proc.stdin.close()  # end of input: it exits
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_shared_code_objects_are_walked_once() -> None:
    # marshal stores an object met again as a reference: 50 x 50 x ... copies of one class
    # body cost nothing to send and must cost nothing to walk
    code = compile("import x\n", "mod.py", "exec")
    for _ in range(6):
        code = code.replace(co_consts=(code,) * 50)
    source_size = 0
    pyc = importlib._bootstrap_external._code_to_timestamp_pyc(code, 0, source_size)  # type: ignore[attr-defined]
    assert len(pyc) < 10_000
    assert module_imports(pyc) == [("x", (), 0)] * 7  # one per distinct code object


def test_names_no_one_could_import_are_left_out() -> None:
    long_name = ".".join(["a"] * 40)
    found = module_imports(pyc_of(f"import {long_name}\nimport ok\nfrom b import {'c' * 300}, d\n"))
    assert found == [("ok", (), 0), ("b", ("d",), 0)]
