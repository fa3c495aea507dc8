"""The one command-line layer of the engine: `--key=value` overrides on a typed dataclass config.

    def main(argv=None) -> int:
        return cli.main(GenerateConfig, run, argv, prog="python -m florenz_fast.generate", description=__doc__)

Every command (train, generate, eval, scaling, bench/throughput.py) is a dataclass config plus a function of it;
this module turns a command line into that config through `config.apply_overrides`, so no command mirrors its
fields in argparse. Spellings accepted for a field `num_beams` (nested fields are dotted: `--optim.lr=3e-4`):

    --num_beams=4    num_beams=4    --num-beams=4    --num-beams 4    (dashes in a key read as underscores)
    --prefix         a bool field given alone means true (`--prefix=false` turns it off)

`--help` / `-h` prints the command's one-line description and its config tree (dotted name, type, default, doc)
and exits 0 (also into a pipe its reader closes early, `--help | head`).

Errors (`guarded`): one line `error: ...` on stderr, no traceback, and the exit status says which kind:
    2  usage: unknown key, bad value, missing required field, a failed `validate()`, a file named on the command
       line that does not exist (FileNotFoundError), or a `UsageError` the command raises for its own input
    1  run-time failure: any other exception while the command runs (an unreadable image, a failed write, ...)
  130  interrupted (Ctrl-C)
`--debug` (or env FLORENZ_DEBUG=1) also prints the traceback above the `error:` line.

Field docs follow the convention the configs already use: the comment that ends the field's line, else the
comment lines right above it (read from the class source). A field without a default is required.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import traceback
import typing
from typing import Any, Callable, Literal

from .config import _coerce, apply_overrides, field_hint

_REQUIRED = object()  # the default of a field that has none
_DOC_CHARS = 110  # a doc longer than this is cut (a few configs explain their choice in a paragraph)
DEBUG_ENV = "FLORENZ_DEBUG"
USAGE, FAILURE, INTERRUPTED = 2, 1, 130  # exit statuses (0: success)


_debug = False  # the --debug of the command line now running (cli.main sets it; `debugging()` reads it)


def debugging() -> bool:
    """Whether the running command was asked for tracebacks (--debug or FLORENZ_DEBUG=1): commands that turn
    errors into output rows (generate's batch mode) print those tracebacks too."""
    return _debug or pop_debug([])[0]


class UsageError(ValueError):
    """Input the user fixes on the command line (a bad option, a missing or malformed input file): exit 2."""


def pop_debug(argv: list[str], cls: type | None = None) -> tuple[bool, list[str]]:
    """(debug?, argv without `--debug`): the flag, or env FLORENZ_DEBUG=1. Left alone if `cls` has a `debug` field."""
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if cls is not None and "debug" in {f.name for f in dataclasses.fields(cls)}:
        return debug, argv
    rest = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "--debug":
            debug = not eq or value.strip().lower() in ("1", "true", "yes", "on")
        else:
            rest.append(arg)
    return debug, rest


def error_message(exc: BaseException) -> str:
    """One line naming what failed: the exception's own message (KeyError unquoted), else its type."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc)
    text = " ".join(text.split())  # one line, whatever the message held
    if not text:
        return type(exc).__name__
    if isinstance(exc, (ValueError, OSError, KeyError, RuntimeError)):  # our messages name the file / key / value
        return text
    return f"{type(exc).__name__}: {text}"  # an unexpected kind (TypeError, AssertionError): say which


def _quiet_stdout() -> None:
    """After a reader closed our stdout (`| head`): point fd 1 at /dev/null, so that the interpreter's final flush
    does not print a second BrokenPipeError ("Exception ignored ...") at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (pytest's capture): nothing to protect
        pass


def print_help(text: str) -> int:
    """Print a help text; 0, also when the reader of a pipe stops early."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _quiet_stdout()
    return 0


def report(exc: BaseException, status: int, *, debug: bool = False, message: str | None = None) -> int:
    """Print `exc` as one `error:` line (the traceback first with `debug`); return `status`."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    hint = f" (--debug or {DEBUG_ENV}=1 shows the traceback)" if status == FAILURE and not debug else ""
    print(f"error: {message or error_message(exc)}{hint}", file=sys.stderr, flush=True)
    return status


def guarded(run: Callable[[], Any], *, debug: bool = False) -> int:
    """run() under the command-line error convention (module doc): its int result is the exit status (anything
    else means 0); an exception becomes one `error:` line and 2, 1 or 130; with `debug` the traceback first."""
    try:
        result = run()
    except BrokenPipeError as exc:  # our stdout's reader went away (`| head`): stop, quietly unless debugging
        _quiet_stdout()
        return report(exc, FAILURE, debug=True, message="output closed early (broken pipe)") if debug else FAILURE
    except KeyboardInterrupt as exc:
        return report(exc, INTERRUPTED, debug=debug, message="interrupted")
    except (UsageError, FileNotFoundError) as exc:
        return report(exc, USAGE, debug=debug)
    except Exception as exc:  # noqa: BLE001 - the CLI's last resort: one line instead of a traceback
        return report(exc, FAILURE, debug=debug)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def normalize(cls: type, argv: list[str]) -> list[str]:
    """argv in any accepted spelling -> canonical `--dotted.key=value` items (ValueError naming a bad key)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            body = arg[2:]
        elif "=" in arg and not arg.startswith("-"):
            body = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}: options are --key=value (see --help)")
        key, eq, value = body.partition("=")
        key = key.replace("-", "_")
        hint = field_hint(cls, key, f"option {arg!r}")
        if not eq:
            if hint is bool:
                value = "true"
            elif i < len(argv) and not argv[i].startswith("--"):  # `--key value`
                value = argv[i]
                i += 1
            else:
                raise ValueError(f"option {arg!r} needs a value (--{key}=VALUE)")
        out.append(f"--{key}={value}")
    return out


def from_overrides(cls: type, overrides: list[str]) -> Any:
    """A `cls` from canonical overrides: required fields (no default) first, then apply_overrides (validates)."""
    hints = typing.get_type_hints(cls)
    required = [f.name for f in dataclasses.fields(cls) if _default(f) is _REQUIRED]
    given, rest = {}, []
    for item in overrides:
        key, value = item[2:].split("=", 1)
        if key in required:
            given[key] = _coerce(value, hints[key], f"option {item!r}")
        else:
            rest.append(item)
    missing = [name for name in required if name not in given]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(f'--{name}=...' for name in missing)}")
    return apply_overrides(cls(**given), rest)


def parse(cls: type, argv: list[str], build: Callable[[list[str]], Any] | None = None) -> Any:
    """The config of a command line (no --help handling); ValueError / KeyError on a usage error."""
    overrides = normalize(cls, list(argv))
    return build(overrides) if build is not None else from_overrides(cls, overrides)


def main(cls: type, run: Callable[[Any], Any], argv: list[str] | None = None, *, prog: str, description: str = "",
         build: Callable[[list[str]], Any] | None = None, defaults: Any = None) -> int:
    """A whole command line: --help, parse (or one `error:` line and 2), then `run(cfg)` under `guarded`.

    `build(overrides)` replaces the default construction (train applies --recipe/--preset first); `defaults` is
    the instance whose values --help shows (default: the class's own defaults). run's int result is the exit
    status; anything else (None, a report dict) means 0. `--debug` is taken out of argv (module doc).
    """
    global _debug
    debug, argv = pop_debug(list(sys.argv[1:] if argv is None else argv), cls)
    _debug = debug
    if any(a in ("-h", "--help") for a in argv):
        return print_help(help_text(cls, prog=prog, description=description, defaults=defaults))

    try:
        cfg = parse(cls, argv, build)
    except (ValueError, KeyError) as exc:
        return report(exc, USAGE, debug=debug)
    return guarded(lambda: run(cfg), debug=debug)


# ---- --help ---------------------------------------------------------------------------------------------------


def help_text(cls: type, *, prog: str, description: str = "", defaults: Any = None) -> str:
    """Usage line, the first paragraph of `description` on one line, and one row per leaf field of the tree."""
    summary = " ".join(description.strip().split("\n\n")[0].split())
    rows = list(_rows(cls, defaults, ""))
    # a column is as wide as its longest cell up to `cap`; a longer cell (a long default) overflows its own row
    caps = (40, 24, 28)
    widths = [max([len(r[c]) for r in rows if r[1] and len(r[c]) <= cap] or [0]) for c, cap in enumerate(caps)]
    lines = [f"usage: {prog} [--key=value ...]"] + ([summary] if summary else []) + [
        "", "options (also key=value, --key value, --dashed-key; a bool option alone means true):"]
    for row in rows:
        if row[1] == "":  # a section header
            lines.append(f"  {row[0]}  {row[3]}".rstrip())
            continue
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths)]
        lines.append(f"  {' '.join(cells)}  {row[3]}".rstrip())
    lines += ["", f"--debug (or env {DEBUG_ENV}=1) prints an error's traceback. Exit status: 0 done, 1 the run "
              "failed, 2 a usage error (one `error:` line names the key, file or value)."]
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def _rows(cls: type, instance: Any, prefix: str):
    """(name, type, default, doc) per leaf field; (section, "", "", doc) where a nested config starts."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        value = getattr(instance, f.name) if instance is not None else _default(f)
        if dataclasses.is_dataclass(hint):
            doc = docs.get(f.name) or _class_doc(hint)
            yield (f"{prefix}{f.name}.", "", "", doc)
            yield from _rows(hint, None if value is _REQUIRED else value, f"{prefix}{f.name}.")
        else:
            shown = "(required)" if value is _REQUIRED else format_value(value)
            yield (f"--{prefix}{f.name}", type_name(hint), shown, docs.get(f.name, ""))


def _class_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a doc
        return ""
    return _one_line(doc.strip().split("\n\n")[0])


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DOC_CHARS else text[:_DOC_CHARS - 1].rstrip() + "…"


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        return f"tuple[{type_name(args[0])}, ...]"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(type_name(a) for a in args)
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def format_value(value: Any) -> str:
    """A default as one would type it after `=`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def field_docs(cls: type) -> dict[str, str]:
    """One-line docs of a dataclass's fields: the comment ending the field's line, else the comments above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (an interactive session, a zip without .py files)
        return {}
    trailing, standalone = {}, {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                (standalone if not tok.line[:tok.start[1]].strip() else trailing)[tok.start[0]] = text
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class "))
    body = next((line for line in lines[start + 1:] if line.strip()), "")
    indent = body[:len(body) - len(body.lstrip())]
    names = {f.name for f in dataclasses.fields(cls)}
    field_line = re.compile(re.escape(indent) + r"(\w+)\s*:")
    docs = {}
    for row, line in enumerate(lines, 1):
        m = field_line.match(line)
        if not m or m.group(1) not in names:
            continue
        if row in trailing:
            docs[m.group(1)] = _one_line(trailing[row])
            continue
        above, r = [], row - 1
        while r in standalone:
            above.insert(0, standalone[r])
            r -= 1
        if above:
            docs[m.group(1)] = _one_line(" ".join(above))
    return docs
