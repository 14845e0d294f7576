"""The config file: one TOML file whose values become the command line's defaults.

Where: ``--config FILE`` (before the command), else ``$LAZYCAF_CONFIG``, else
``~/.config/lazycaf/config.toml``, else ``/etc/lazycaf/config.toml``; the first found wins,
and a file named by ``--config`` or ``$LAZYCAF_CONFIG`` that does not exist is an error. A
``--config`` is exported as ``$LAZYCAF_CONFIG`` to the command's children (the daemon a mount
starts, the mount ``lazycaf run`` starts), so they read the same file.

What: every option of the parser, under its long name with dashes (``cache-size``, never
``cache_size``), walked from the parser itself (``commands``), so an option added to the
parser is settable here with no other change. Top-level keys are the options every command
shares (``SHARED_KEYS``: ``cas``, ``cacert``, ``cache``, ``socket``; each applies to every
command that takes it) and the options before the command (``verbose``). A table per command
holds the rest and beats a top-level key: ``[mount]``, ``[pack]``, ...; a subcommand of a
group is ``[GROUP-SUB]`` (``[cas-serve]``, ``[cache-verify]``, ``[profile-show]``), except the
daemon, ``fetcher serve``, which is ``[fetcher]`` (``cas`` and ``cache`` cannot be tables:
they are top-level keys). Values are converted as the flag's text would be (``jobs = 8``,
``cache = "/srv/c"``, ``cache-size = "20G"``); a switch takes ``true`` or ``false``.

Precedence: a flag beats the environment (``ENV_OPTIONS``: ``$LAZYCAF_CAS``,
``$LAZYCAF_CACHE``, ``$SSL_CERT_FILE``) beats the file beats the parser's default. The file is
applied as the parser's defaults before parsing (``apply``), and never where an environment
variable is set (the commands read those themselves). Unknown tables, unknown keys and values
of the wrong type are a ``UsageError`` (exit 2) naming the file and line (``tomllib`` gives no
line numbers: ``_line_of`` scans the text).

Standard library only at import time: ``zygote_client`` reads ``cache`` and ``socket`` through
``preset`` on the fast path of ``lazycaf mount``.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lazycaf.core.errors import UsageError
from lazycaf.host.paths import CONFIG_ENV, CONFIG_SEARCH_PATH

__all__ = [
    "CONFIG_ENV",
    "ENV_OPTIONS",
    "SEARCH_PATH",
    "SHARED_KEYS",
    "Command",
    "ConfigFile",
    "Setting",
    "apply",
    "commands",
    "explicit_config",
    "load_config",
    "preset",
    "resolve",
    "without_config",
]

SEARCH_PATH: Final = CONFIG_SEARCH_PATH
SHARED_KEYS: Final = frozenset({"cas", "cacert", "cache", "socket"})
ENV_OPTIONS: Final = {"cas": "LAZYCAF_CAS", "cache": "LAZYCAF_CACHE", "cacert": "SSL_CERT_FILE"}
# every other command's table: its words joined by "-"
_TABLE_NAMES: Final[dict[tuple[str, ...], str]] = {("fetcher", "serve"): "fetcher"}
_CONFIG_FLAG: Final = "--config"


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file; ``found_by`` says how (``--config``, ``$LAZYCAF_CONFIG``,
    ``search``)."""

    path: Path
    found_by: str
    data: dict[str, Any]
    text: str = field(repr=False)

    def where(self, table: str | None, key: str | None = None) -> str:
        return f"{self.path}:{_line_of(self.text, table, key)}"

    def lookup(self, table: str | None, key: str) -> tuple[Any, str] | None:
        """The file's value of ``key`` for the command of ``table`` (None: the options
        before the command) and where it is: the table's own, else a top-level key."""
        own = self.data.get(table) if table is not None else None
        if isinstance(own, dict) and key in own:
            return own[key], self.where(table, key)
        top = key in self.data and not isinstance(self.data[key], dict)
        if top and (table is None or key in SHARED_KEYS):
            return self.data[key], self.where(None, key)
        return None


@dataclass(frozen=True)
class Command:
    """A command that runs (a leaf of the parser), or the options before any (``table``
    None); ``options`` maps each settable long name to its action."""

    table: str | None
    words: tuple[str, ...]
    parser: argparse.ArgumentParser
    options: dict[str, argparse.Action]


@dataclass(frozen=True)
class Setting:
    """An option's effective value and where it came from: ``source`` is ``flag``, ``env``,
    ``file`` or ``default``; ``where`` the variable's name or ``FILE:LINE``."""

    value: Any
    source: str
    where: str | None = None


# -- finding and reading the file -----------------------------------------------------------
def explicit_config(argv: list[str]) -> str | None:
    """The ``--config`` of a command line (what precedes ``--`` only)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == _CONFIG_FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(_CONFIG_FLAG + "="):
            return arg.partition("=")[2]
    return None


def without_config(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config FILE`` taken out (to find the command word)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == _CONFIG_FLAG:
            skip = True
        elif not arg.startswith(_CONFIG_FLAG + "="):
            out.append(arg)
    return out


def load_config(explicit: str | None, env: Mapping[str, str] | None = None) -> ConfigFile | None:
    """The config file a command uses (module docstring), parsed; None when there is none."""
    env = os.environ if env is None else env
    if explicit is not None or env.get(CONFIG_ENV):
        path, found_by = (
            (Path(explicit), _CONFIG_FLAG)
            if explicit is not None
            else (Path(env[CONFIG_ENV]), f"${CONFIG_ENV}")
        )
        if not path.is_file():
            raise UsageError(f"config file {path} (from {found_by}) does not exist")
    else:
        found = [p for p in (Path(s).expanduser() for s in SEARCH_PATH) if p.is_file()]
        if not found:
            return None
        path, found_by = found[0], "search"
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    return ConfigFile(path, found_by, data, text)


def _line_of(text: str, table: str | None, key: str | None) -> int:
    """The line of ``key`` in ``[table]`` (None: top level), or of the table's header when
    ``key`` is None or not found; 1 when neither is (a dotted key, an inline table)."""
    current: str | None = None
    header = 1
    key_re = re.compile(rf"""\s*(["']?){re.escape(key or "")}\1\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        head = re.match(r"""\s*\[\s*(["']?)([^\]"']*)\1\s*\]""", line)
        if head:
            current = head.group(2).strip()
            if current == table:
                header = number
                if key is None:
                    return number
        elif key is not None and current == table and key_re.match(line):
            return number
    return header


# -- the parser's options ------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if (
            action.help == argparse.SUPPRESS
            or action.dest in ("help", "version", "config")
            or isinstance(action, argparse._SubParsersAction)
        ):
            continue
        long = next((s for s in action.option_strings if s.startswith("--")), None)
        if long is not None:
            options[long[2:]] = action
    return options


def commands(root: argparse.ArgumentParser) -> list[Command]:
    """The options before the command, then every command that runs, in parser order."""
    found = [Command(None, (), root, _options(root))]

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subs = _subcommands(parser)
        if not subs:
            table = _TABLE_NAMES.get(words, "-".join(words))
            found.append(Command(table, words, parser, _options(parser)))
        for name, sub in subs.items():
            walk(sub, (*words, name))

    walk(root, ())
    return found


# -- values --------------------------------------------------------------------------------
def _convert(action: argparse.Action, key: str, raw: Any, where: str) -> Any:
    """``raw`` (a TOML value) as the flag ``--key`` would have made it."""
    if action.nargs == 0:  # a switch: store_true and friends
        if not isinstance(raw, bool):
            raise UsageError(f"{where}: {key} is a switch: write true or false, not {raw!r}")
        return action.const if raw else action.default
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise UsageError(f"{where}: {key} takes a value like its flag's, not {raw!r}")
    text = str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"{where}: invalid value for {key}: {raw!r} ({exc})") from exc
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: {key} must be one of {', '.join(map(str, action.choices))}")
    return value


def resolve(
    command: Command, config: ConfigFile | None, env: Mapping[str, str] | None = None
) -> dict[str, Setting]:
    """Each option's value and source before the flags: environment, file, default."""
    env = os.environ if env is None else env
    settings: dict[str, Setting] = {}
    for key, action in command.options.items():
        var = ENV_OPTIONS.get(key)
        found = config.lookup(command.table, key) if config is not None else None
        if var is not None and env.get(var):
            settings[key] = Setting(env[var], "env", var)
        elif found is not None:
            raw, where = found
            settings[key] = Setting(_convert(action, key, raw, where), "file", where)
        else:
            settings[key] = Setting(action.default, "default")
    return settings


def _check_keys(config: ConfigFile, known: list[Command]) -> None:
    tables = {c.table: c for c in known if c.table is not None}
    top = set(SHARED_KEYS) | set(known[0].options)
    for name, value in config.data.items():
        if isinstance(value, dict):
            if name not in tables:
                subs = ", ".join(f"[{t}]" for t in tables if t.startswith(f"{name}-"))
                hint = f" (a subcommand's table is named after both words: {subs})" if subs else ""
                raise UsageError(f"{config.where(name)}: unknown table [{name}]{hint}")
            for key in value:
                if key not in tables[name].options:
                    hint = _hint(key, tables[name].options)
                    raise UsageError(
                        f"{config.where(name, key)}: unknown key {key!r} in [{name}]{hint}"
                    )
        elif name not in top:
            hint = _hint(name, top)
            raise UsageError(f"{config.where(None, name)}: unknown top-level key {name!r}{hint}")


def _hint(key: str, known: Mapping[str, object] | set[str]) -> str:
    dashed = key.replace("_", "-")
    if dashed != key and dashed in known:
        return f" (options are written with dashes: {dashed})"
    return ""


def apply(root: argparse.ArgumentParser, config: ConfigFile | None) -> None:
    """Check the whole file, then make its values the defaults of every command's parser
    (where no environment variable overrides them)."""
    if config is None:
        return
    known = commands(root)
    _check_keys(config, known)
    for command in known:
        for key, setting in resolve(command, config).items():
            if setting.source == "file":
                command.parser.set_defaults(**{command.options[key].dest: setting.value})


def preset(argv: list[str], table: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The file's values of ``keys`` for the command of ``table`` as text, except where the
    environment sets them: what ``zygote_client`` needs before any parser exists (it checks
    nothing else; the command itself reports a bad file)."""
    config = load_config(explicit_config(argv))
    out: dict[str, str] = {}
    for key in keys:
        found = config.lookup(table, key) if config is not None else None
        var = ENV_OPTIONS.get(key)
        if found is not None and not (var is not None and os.environ.get(var)):
            out[key] = str(found[0])
    return out


# -- lazycaf config show -------------------------------------------------------------------
_UNSET: Final = object()


def _given(
    build: Any, command_line: list[str]
) -> tuple[tuple[str, ...], dict[str | None, dict[str, Any]]]:
    """The command a command line runs and the options its flags set (by table)."""
    if "--" in command_line:
        command_line = command_line[: command_line.index("--")]
    root = build()
    known = commands(root)
    for command in known:
        for action in command.options.values():
            action.default = _UNSET
    namespace = root.parse_args(command_line)
    parser, words = root, tuple[str, ...]()
    while subs := _subcommands(parser):
        dest = next(a.dest for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        name = getattr(namespace, dest)
        parser, words = subs[name], (*words, name)
    flags: dict[str | None, dict[str, Any]] = {}
    for command in known:
        if command.table is None or command.words == words:
            flags[command.table] = {
                key: getattr(namespace, action.dest)
                for key, action in command.options.items()
                if getattr(namespace, action.dest, _UNSET) is not _UNSET
            }
    return words, flags


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


async def show(args: argparse.Namespace) -> int:
    """``lazycaf config show [--json] [-- COMMAND ARGS ...]``: each command's effective
    options and their sources; with a command line, that command's, its flags included."""
    import json

    from lazycaf.cli.main import build_parser

    config = load_config(args.config)
    known = commands(build_parser())
    if config is not None:
        _check_keys(config, known)
    flags: dict[str | None, dict[str, Any]] = {}
    if args.cmd:
        words, flags = _given(build_parser, args.cmd)
        known = [c for c in known if c.table is None or c.words == words]
    report: dict[str, Any] = {
        "file": None if config is None else str(config.path),
        "found_by": None if config is None else config.found_by,
        "commands": {},
    }
    for command in known:
        settings = resolve(command, config)
        for key, value in flags.get(command.table, {}).items():
            settings[key] = Setting(value, "flag")
        report["commands"][" ".join(command.words)] = {
            "table": command.table,
            "options": {
                key: {"value": _jsonable(s.value), "source": s.source, "where": s.where}
                for key, s in settings.items()
            },
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    found = "none" if config is None else f"{config.path} (found by {config.found_by})"
    print(f"config file: {found}")
    for words, entry in report["commands"].items():
        table = f"[{entry['table']}]" if entry["table"] else "top level"
        print(f"{table} (lazycaf {words or 'options before the command'}):")
        for key, s in entry["options"].items():
            where = f" {s['where']}" if s["where"] else ""
            print(f"  {key} = {s['value']!r}  [{s['source']}{where}]")
    return 0
