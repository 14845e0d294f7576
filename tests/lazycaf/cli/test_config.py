"""The config file (``lazycaf.cli.config``) through the real CLI: a file alone drives ``ls``,
``mount`` and the daemon a mount starts; flags beat the environment beats the file; ``config
show`` names each value's source; bad files fail with exit 2 naming file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Host
from tests.helpers import make_tree, pack


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No LAZYCAF_* variable, and a HOME of the test's own (so ~/.config is the test's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAZYCAF_")}
    return {**env, "HOME": str(home), **extra}


def lazycaf(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazycaf", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def user_config(home: Path, text: str) -> Path:
    path = home / ".config" / "lazycaf" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def packed_cas(tmp_path: Path, name: str, file_name: str) -> Path:
    """A directory CAS whose ref ``t`` holds a tree with ``file_name`` in it."""
    tree = tmp_path / f"tree-{name}"
    tree.mkdir()
    (tree / file_name).write_text(name)
    cas = tmp_path / f"cas-{name}"
    pack(tree, cas, "--tag", "t")
    return cas


def test_a_config_file_alone_drives_ls(tmp_path: Path) -> None:
    cas = packed_cas(tmp_path, "a", "from-file")
    home = tmp_path / "home"
    env = clean_env(home)
    assert lazycaf("ls", "t", env=env).returncode != 0  # the default CAS has no ref t
    user_config(home, f'cas = "{cas}"\n')
    out = lazycaf("ls", "t", env=env)
    assert out.returncode == 0, out.stderr
    assert "from-file" in out.stdout


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    cas = {n: packed_cas(tmp_path, n, f"only-in-{n}") for n in ("file", "env", "flag")}
    config = tmp_path / "lazycaf.toml"
    config.write_text(f'cas = "{cas["file"]}"\n')
    env = clean_env(tmp_path / "home")

    def listed(*extra: str, **variables: str) -> str:
        out = lazycaf("--config", config, "ls", "t", *extra, env={**env, **variables})
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "only-in-file" in listed()
    assert "only-in-env" in listed(LAZYCAF_CAS=str(cas["env"]))
    assert "only-in-flag" in listed("--cas", str(cas["flag"]), LAZYCAF_CAS=str(cas["env"]))
    # $LAZYCAF_CONFIG finds the file too; a table's key beats the top-level one
    config.write_text(f'cas = "{cas["file"]}"\n[ls]\ncas = "{cas["flag"]}"\n')
    out = lazycaf("ls", "t", env={**env, "LAZYCAF_CONFIG": str(config)})
    assert "only-in-flag" in out.stdout, out.stderr


def test_config_show_names_each_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '# the fleet\ncache = "/srv/cache"\ncas = "/srv/cas"\n\n[fetcher]\n'
        'cache-size = "20G"\ngc-high = 0.95\npeer-timeout = 3\n'
    )
    env = clean_env(tmp_path / "home", LAZYCAF_CAS="/env/cas")
    out = lazycaf(
        "--config", config, "config", "show", "--json", "--",
        "fetcher", "serve", "--gc-high", "0.5",
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["file"] == str(config) and report["found_by"] == "--config"
    assert set(report["commands"]) == {"", "fetcher serve"}
    serve = report["commands"]["fetcher serve"]
    assert serve["table"] == "fetcher"
    options = serve["options"]
    assert options["cache"] == {"value": "/srv/cache", "source": "file", "where": f"{config}:2"}
    assert options["cas"] == {"value": "/env/cas", "source": "env", "where": "LAZYCAF_CAS"}
    assert options["cache-size"] == {"value": "20G", "source": "file", "where": f"{config}:6"}
    assert options["gc-high"] == {"value": 0.5, "source": "flag", "where": None}
    assert options["peer-timeout"]["value"] == 3.0  # converted like the flag's text
    assert options["gc-low"]["source"] == "default"
    # without a command line: every command, sub-subcommands under their tables
    everything = json.loads(lazycaf("--config", config, "config", "show", "--json", env=env).stdout)
    tables = {c["table"] for c in everything["commands"].values()}
    assert {"mount", "fetcher", "cas-serve", "cache-verify", "profile-show"} <= tables
    assert everything["commands"]["mount"]["options"]["cache"]["source"] == "file"
    assert everything["commands"]["cas serve"]["options"]["listen"]["source"] == "default"
    text = lazycaf("--config", config, "config", "show", env=env).stdout
    assert f"cache-size = '20G'  [file {config}:6]" in text


def test_bad_config_files_fail_naming_file_and_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    config = tmp_path / "c.toml"
    cases = {
        'cas = "/x"\n\n[mount]\neager-share = 0.5\ncache_size = "1G"\n': (
            f"{config}:5: unknown key 'cache_size' in [mount] "
            "(options are written with dashes: cache-size)"
        ),
        'cas = "/x"\nrecursive = true\n': f"{config}:2: unknown top-level key 'recursive'",
        '[ls]\nrecursive = true\n[cas]\nroot = "/r"\n': f"{config}:3: unknown table [cas]",
        "[mount]\n  eager-share = 'lots'\n": f"{config}:2: invalid value for eager-share: 'lots'",
        "[pack]\njobs = 2.5\n": f"{config}:2: invalid value for jobs: 2.5",
        '[ls]\nrecursive = "yes"\n': f"{config}:2: recursive is a switch",
        "[ls\n": f"{config}: ",
    }
    for text, message in cases.items():
        config.write_text(text)
        out = lazycaf("--config", config, "ls", "t", env=env)
        assert out.returncode == 2, (text, out.stderr)
        assert out.stderr.startswith(f"lazycaf: error: {message}"), (text, out.stderr)
    for how in (["--config", tmp_path / "none.toml"], []):
        out = lazycaf(*how, "ls", "t", env={**env, "LAZYCAF_CONFIG": str(tmp_path / "no.toml")})
        assert out.returncode == 2 and "does not exist" in out.stderr, out.stderr


def test_a_config_file_alone_drives_mount_and_its_daemon(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    pack(tree, cas, "--tag", "tool:1")
    home = tmp_path / "home"
    user_config(
        home,
        f'cas = "{cas}"\ncache = "{host.cache}"\n\n[mount]\nprofile = "from-config"\n'
        'eager-share = 0\n\n[fetcher]\ncache-size = "64M"\n',
    )
    env = clean_env(home)
    mnt = host.mountpoint()
    out = lazycaf("mount", "tool:1", mnt, env=env)
    assert out.returncode == 0, out.stderr
    try:
        assert (mnt / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
        stats = json.loads(lazycaf("stats", "--json", env=env).stdout)
        assert stats["budget"] == 64 << 20  # [fetcher] reached the daemon the mount started
    finally:
        assert lazycaf("umount", mnt, env=env).returncode == 0
    # the [mount] table's profile: the run was recorded under it
    shown = lazycaf("profile", "show", "from-config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "bin/tool" in shown.stdout


def test_the_zygote_client_finds_the_configured_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount's zygote is the one beside the daemon of the cache the config file names
    (flags, then environment, then file), or the mount would never reach it."""
    from lazycaf.cli.zygote_client import _fetcher_socket, _mount_argv

    config = tmp_path / "c.toml"
    config.write_text(f'cache = "{tmp_path / "top"}"\n[mount]\nsocket = "{tmp_path / "s"}"\n')
    monkeypatch.delenv("LAZYCAF_CACHE", raising=False)
    monkeypatch.setenv("LAZYCAF_CONFIG", str(config))
    assert _fetcher_socket(["mount", "r", "m"]) == tmp_path / "s"
    config.write_text(f'cache = "{tmp_path / "top"}"\n')
    assert _fetcher_socket(["mount", "r", "m"]) == tmp_path / "top" / "fetcher.sock"
    monkeypatch.setenv("LAZYCAF_CACHE", str(tmp_path / "env"))
    assert _fetcher_socket(["mount", "r", "m"]) == tmp_path / "env" / "fetcher.sock"
    flag = ["mount", "--cache", str(tmp_path / "flag"), "r", "m"]
    assert _fetcher_socket(flag) == tmp_path / "flag" / "fetcher.sock"
    assert _mount_argv(["--config", str(config), "mount", "r", "m"])
