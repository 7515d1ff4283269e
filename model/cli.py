"""The command-line plumbing of both faces: a flag's value coerced to its field's type, an
unknown option named with the nearest one, repeated flags refused, an options dataclass built
from arguments, and --help lines written from the comments beside the fields.

Imports nothing heavy and nothing of the project but its errors: config.py and the faces use it.
"""

from __future__ import annotations

import difflib
import inspect
import io
import math
import os
import sys
import tokenize
from dataclasses import fields
from functools import cache
from typing import Any

from model.errors import UserError

_TYPE_NAMES = {int: 'an integer', float: 'a number', bool: 'true or false', str: 'a string'}


def refuse_control_char(path: str, what: str) -> None:
    """A path holding a control character (a line break, a tab, DEL, ...) is refused: it would print
    lines of its own into the one-path-a-line reports the start script reads."""
    odd = next((ch for ch in path if ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in '\u2028\u2029'), None)
    if odd:
        raise UserError(f'{what}{path!r} holds a control character ({odd!r}: a line break or the like), which would '
                        f'break the one-path-a-line reports; rename it without one')


def field_types(cls) -> dict[str, type]:
    # `from __future__ import annotations` turns annotations into strings
    names = {'int': int, 'float': float, 'bool': bool, 'str': str}
    return {f.name: names[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def coerce(name: str, value: Any, typ: type) -> Any:
    """Turn a value as Fire parsed it into the field's type, or raise UserError.

    Fire hands over ``--x=1`` as int, ``--x=1e-4`` as float, ``--x=true`` as
    bool, and anything it cannot parse as a literal as str.
    """
    bad = UserError(f'--{name}={value!r}: expected {_TYPE_NAMES[typ]} for {name}')
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ('true', 'false', 'yes', 'no', '1', '0'):
            return value.strip().lower() in ('true', 'yes', '1')
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) >= 1e3:
            return int(value)  # --max_steps=1e4 arrives as 10000.0
        if isinstance(value, str):
            try:
                return int(value.strip().replace('_', ''), 10)
            except ValueError:
                raise bad from None
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise UserError(f'--{name}={value}: expected a finite number for {name}')
            return float(value)
        raise bad
    if typ is str:
        if isinstance(value, bool):  # a flag given without a value: --out_dir
            raise UserError(f'--{name} needs a value: --{name}=...')
        if isinstance(value, (list, tuple, dict)):
            raise bad
        return str(value)
    raise TypeError(f'unsupported field type {typ}')  # a bug in the schema


MAX_SEED = 2**32 - 1  # numpy, torch and sklearn all take seeds in [0, 2**32)


def check_seeds(options) -> None:
    """Every seed of an options dataclass (a field named *seed) is one the libraries take."""
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name.endswith('seed') and isinstance(value, int) and not 0 <= value <= MAX_SEED:
            raise UserError(f'--{f.name}={value}: give a seed from 0 to {MAX_SEED:,} (2**32 - 1)')


def nearest_field(name: str, candidates) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_option(name: str, candidates) -> UserError:
    near = nearest_field(name, candidates)
    hint = f'; did you mean --{near}?' if near else '; run with --help for the list of options'
    return UserError(f'unknown option --{name}{hint}')


@cache
def field_comments(cls) -> dict[str, str]:
    """field name -> the comment written after it in the class's source: the one place a
    field is explained, shown by --help."""
    out: dict[str, str] = {}
    source = inspect.getsource(cls)
    names = {f.name for f in fields(cls)}
    pending = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            pending = tok.string
        elif tok.type == tokenize.COMMENT and pending:
            out[pending] = tok.string.lstrip('#').strip()
            pending = None
        elif tok.type == tokenize.NEWLINE:
            pending = None
    return out


def format_options(cls, only=None, defaults: dict | None = None) -> list[str]:
    """Aligned `--name=default  comment` lines of a dataclass's fields."""
    comments = field_comments(cls)
    lines = []
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        value = (defaults or {}).get(f.name, f.default)
        shown = f'--{f.name}={value}'
        lines.append(f'  {shown:<44} {comments.get(f.name, "")}'.rstrip())
    return lines


def check_repeated_flags(args: list[str], positional: bool = True) -> None:
    """A flag given twice is a mistake (which one was meant?), not 'the last one wins'. Where a
    command takes no positional arguments, a word that is neither --name=value nor the value of
    a preceding --name (e.g. `epochs=2`, a missing --) is a mistake too, not silently dropped."""
    seen = set()
    for i, arg in enumerate(args):
        if arg == '--':  # Fire reads what follows as its own flags and drops the rest: --dry_run=True there trained
            raise UserError("unexpected argument '--': what follows it would not reach the command (Fire reads it, "
                            "and drops what it does not know); leave the '--' out")
        if arg.startswith('--') and len(arg) > 2:
            name = arg[2:].split('=', 1)[0].replace('-', '_')
            if name in seen:
                raise UserError(f'--{name} is given twice; give it once')
            seen.add(name)
        elif not positional and not (i and args[i - 1].startswith('--') and '=' not in args[i - 1]):
            hint = f' (--{arg.lstrip("-")}?)' if '=' in arg else ''
            raise UserError(f'unexpected argument {arg!r}: options are written --name=value{hint}')


def text_fields(*classes) -> set[str]:
    """The names of the string fields of these dataclasses (flags whose values are text: paths,
    column names, choices)."""
    return {name for cls in classes for name, typ in field_types(cls).items() if typ is str}


def keep_text(args: list[str], text_flags, positional: bool = False) -> list[str]:
    """The arguments for Fire with each value of a text flag (and, ``positional``, each positional
    argument) written as a Python string literal. Fire reads a value as a literal where it
    parses as one, so --output_dir=2024_12_07 reached the program as 20241207 (a folder of
    another name), 1e3 as 1000.0, 0x10 as 16; quoted, each reaches it as typed."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == '--':
            return out + args[i:]
        if arg.startswith('--') and len(arg) > 2:
            name, eq, value = arg[2:].partition('=')
            text = name.replace('-', '_') in text_flags
            out.append(f'--{name}={value!r}' if text and eq else arg)
            # --name value: the next word is its value (a text one may start with '-'; '--x' is the next flag)
            if not eq and i + 1 < len(args) and not args[i + 1].startswith('--' if text else '-'):
                out.append(repr(args[i + 1]) if text else args[i + 1])
                i += 1
        else:
            out.append(repr(arg) if positional and not arg.startswith('-') else arg)
        i += 1
    return out


def parse_options(cls, command: str, args: tuple, flags: dict, positional: tuple[str, ...],
                  required: tuple[str, ...] = ()):
    """An options dataclass from positional args and --flags, every value coerced to its
    field's type; an unknown flag names the nearest one, a missing argument the usage."""
    types = field_types(cls)
    if len(args) > len(positional):
        raise UserError(f'{command}: too many arguments ({" ".join(map(str, args))}); '
                        f'see: python prepare_data.py {command} --help')
    values = dict(zip(positional, args))
    for name, value in flags.items():
        if name not in types:
            raise unknown_option(name, types)
        if name in values:
            raise UserError(f'{command}: {name} given twice')
        values[name] = value
    missing = [n for n in (*positional, *required) if values.get(n) in (None, '')]
    if missing:
        raise UserError(f'{command} needs {" and ".join(n.upper() for n in missing)}; '
                        f'see: python prepare_data.py {command} --help')
    options = cls(**{k: coerce(k, v, types[k]) for k, v in values.items()})
    check_seeds(options)
    return options


def quiet_on_broken_pipe(main) -> None:
    """Run a face's main; when the reader of its output goes away (`... --help | head`), stop
    quietly (exit 0) instead of a traceback, also at the interpreter's final flush."""
    try:
        main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
