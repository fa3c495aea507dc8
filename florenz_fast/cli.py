"""The one command-line layer of the engine: `--key=value` overrides on a typed dataclass config.

    def main(argv=None) -> int:
        return cli.main(GenerateConfig, run, argv, prog="python -m florenz_fast.generate", description=__doc__)

Every command (train, generate, eval, scaling, bench/throughput.py) is a dataclass config plus a function of it;
this module turns a command line into that config through `config.apply_overrides`, so no command mirrors its
fields in argparse. Spellings accepted for a field `num_beams` (nested fields are dotted: `--optim.lr=3e-4`):

    --num_beams=4    num_beams=4    --num-beams=4    --num-beams 4    (dashes in a key read as underscores)
    --prefix         a bool field given alone means true (`--prefix=false` turns it off)

`--help` / `-h` prints the command's one-line description and its config tree (dotted name, type, default, doc)
and exits 0. A usage error (unknown key, bad value, missing required field, a failed `validate()`) prints one
line `error: ...` naming the key and exits 2, without a traceback.

Field docs follow the convention the configs already use: the comment that ends the field's line, else the
comment lines right above it (read from the class source). A field without a default is required.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from typing import Any, Callable, Literal

from .config import _coerce, apply_overrides, field_hint

_REQUIRED = object()  # the default of a field that has none
_DOC_CHARS = 110  # a doc longer than this is cut (a few configs explain their choice in a paragraph)


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
    """A whole command line: --help, parse (or one `error:` line and 2), then `run(cfg)`.

    `build(overrides)` replaces the default construction (train applies --recipe/--preset first); `defaults` is
    the instance whose values --help shows (default: the class's own defaults). run's int result is the exit
    status; anything else (None, a report dict) means 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cls, prog=prog, description=description, defaults=defaults))
        return 0
    try:
        cfg = parse(cls, argv, build)
    except (ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    result = run(cfg)
    return result if isinstance(result, int) else 0


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
