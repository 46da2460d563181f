"""Configuration shared by the five scripts.

Every script keeps its settings as an UPPER_CASE constants block with a short
comment per line. This module turns that block into a config:

* ``python SCRIPT.py --key=value``: ``key`` is a constant's name, case-insensitive;
  values parse as Python literals, else as strings; a yes/no setting also takes
  yes/no/on/off and 1/0.
* ``--config=FILE.yaml`` supplies defaults; command-line keys win.
* ``main(**overrides)`` takes the same keys, for notebooks.
* ``--help`` lists every constant with its comment and default.

Unknown keys and wrong types raise :class:`UserError` with the valid keys listed.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import io
import json
import os
import sys
import threading
import tokenize
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .errors import UserError


class Config(dict):
    """A dict with attribute access (``cfg.TOP_K``); keys are the constant names."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def module_constants(namespace: dict) -> dict:
    """The UPPER_CASE, JSON-able constants of a script's global namespace, in order: those the script assigns
    itself (an imported table such as ``BOOL_WORDS`` is no setting, though --help listed it as one)."""
    own = _assigned_names(namespace.get("__file__"))
    out = {}
    for name, value in namespace.items():
        if name.isupper() and not name.startswith("_") and _is_plain(value) and (own is None or name in own):
            out[name] = value
    return out


def _assigned_names(path: str | None) -> set[str] | None:
    """Names a module's source assigns at its top level (None when there is no readable source)."""
    if not path:
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    return {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)}


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def constant_comments(source: str) -> dict:
    """Map ``NAME -> comment`` for lines of the form ``NAME = value  # comment``."""
    comments, last_name = {}, None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return comments
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 0 and tok.string.isupper():
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            last_name = tok.string if nxt is not None and nxt.string == "=" else None
        elif tok.type == tokenize.COMMENT and last_name and last_name not in comments:
            comments[last_name] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NEWLINE:
            last_name = None
    return comments


BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False}  # also read as True/False by a yes/no setting


def parse_value(text: str, switch: bool = False) -> Any:
    """Parse a command-line value as a Python literal, else keep it as a string; for a ``switch`` (a yes/no
    setting) yes/no/on/off too, as shell users write them. Strings reach it from the command line, YAML and
    ``main(**overrides)``; the notebook functions' keyword arguments are checked by :func:`coerce` alone, so
    ``explain_image(..., input_check="no")`` is still refused."""
    lowered = text.strip().lower()
    if switch and lowered in BOOL_WORDS:
        return BOOL_WORDS[lowered]
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(name: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default``; convert where it is safe."""
    if default is None:
        return value
    if isinstance(value, np.generic):  # numpy scalars from a notebook sweep (np.int64, np.float32, np.bool_)
        value = value.item()
    if value is None:  # `--epochs=None`, an empty YAML key: only a setting whose default is None takes it
        raise UserError(f"{name} expects {'True or False' if isinstance(default, bool) else type(default).__name__}, "
                        "got None")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):  # `--json 1`, as a shell user writes a switch
            return bool(value)
        raise UserError(f"{name} expects True or False (or yes/no, on/off, 1/0), got {value!r}")
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, bool):  # `--overlay why.png` (a space, not =) left a bare --overlay
            raise UserError(f"{name} needs a value: --{name.lower()}=VALUE (with '=', not a space)")
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, (str, int, float, list, tuple)):  # str() of an array made a 'file name'
            raise UserError(f"{name} expects text (a string or a path), got a {type(value).__name__}")
        return value if isinstance(value, str) else str(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # --baselines=[pca,channels]: a list without Python's quotes
            inner = value.strip()
            inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
            return [parse_value(item.strip()) for item in inner.split(",") if item.strip()]
        if isinstance(value, (int, float)):
            return [value]
    elif isinstance(default, dict) and isinstance(value, dict):
        return value
    raise UserError(f"{name} expects {type(default).__name__}, got {value!r}")


def closest(key: str, names) -> str | None:
    """The name in ``names`` closest to a mistyped ``key`` (for a 'did you mean' hint), else None."""
    close = difflib.get_close_matches(str(key).lower(), list(names), n=1)
    return close[0] if close else None


CHOICES: dict[str, tuple] = {}  # setting name -> its values, registered by the module that owns them


def register_choices(name: str, choices) -> tuple:
    """Record that setting ``name`` takes one of ``choices`` (:func:`make_config` then reads it case-blind,
    as it reads the keys: ``--arch=BatchTopK`` is ``batchtopk``); returns ``choices`` as a tuple."""
    CHOICES[name] = tuple(choices)
    return CHOICES[name]


def canonical_choice(name: str, value: Any, choices) -> Any:
    """``value``, or the one choice it spells in other case; else the UserError of :func:`require_choice`."""
    if isinstance(value, str) and value not in choices:
        folded = [c for c in choices if isinstance(c, str) and c.casefold() == value.strip().casefold()]
        value = folded[0] if len(folded) == 1 else value
    require_choice(name, value, choices)
    return value


def require_choice(name: str, value: Any, choices) -> None:
    """A UserError naming the choices (and the closest one) when ``value`` is not one of ``choices``."""
    if value in choices:
        return
    close = closest(value, choices) if isinstance(value, str) else None
    hint = f"; did you mean '{close}'?" if close else ""
    raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def make_config(defaults: dict, overrides: dict | None = None) -> Config:
    """Merge case-insensitive ``overrides`` into ``defaults``, checking keys and types."""
    by_lower = {k.lower(): k for k in defaults}
    cfg = Config(defaults)
    for key, value in (overrides or {}).items():
        name = by_lower.get(str(key).lower())
        if name is None:
            close = closest(key, by_lower)
            hint = f"did you mean '{close}'? " if close else ""
            valid = ", ".join(k.lower() for k in defaults)
            raise UserError(f"unknown setting '{key}'; {hint}valid keys: {valid}")
        if isinstance(value, str) and not isinstance(defaults[name], str):
            value = parse_value(value, switch=isinstance(defaults[name], bool))
        cfg[name] = coerce(name, value, defaults[name])
        if name in CHOICES:  # checked as given, before any work (a default is the script's own)
            cfg[name] = canonical_choice(name, cfg[name], CHOICES[name])
    return cfg


def load_yaml_overrides(path: str) -> dict:
    """Read a ``--config=FILE.yaml`` of ``key: value`` pairs."""
    if not Path(path).is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value")
    names = [str(k).lower().replace("-", "_") for k in data]
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:  # EPOCHS and epochs: the last one won, silently (the command line refuses the same)
        raise UserError(f"config file {path} sets {', '.join(twice)} twice (keys are case-blind): keep one")
    return data


def parse_argv(argv: list[str]) -> tuple[dict, bool]:
    """Split ``--key=value`` arguments into overrides; return (overrides, wants_help)."""
    cli, yaml_path, wants_help = {}, None, False
    for arg in argv:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--"):
            raise UserError(f"arguments look like --key=value, got '{arg}' (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:  # a bare --flag means True (yes/no settings only: coerce refuses it elsewhere)
            value = True
        if key.lower() in {k.lower() for k in cli} | ({"config"} if yaml_path else set()):
            raise UserError(f"--{key.lower()} is given twice; give it once")
        if key.lower() == "config":
            yaml_path = value
        else:
            cli[key] = value
    overrides = load_yaml_overrides(yaml_path) if yaml_path else {}
    lowered = {k.lower(): k for k in overrides}
    for key, value in cli.items():  # command-line keys win over the YAML file
        overrides.pop(lowered.get(key.lower(), key), None)
        overrides[key] = value
    return overrides, wants_help


def help_text(doc: str | None, defaults: dict, comments: dict) -> str:
    """The ``--help`` page: the script's docstring, then every constant."""
    lines = [(doc or "").strip(), "", "Settings (--key=value, case-insensitive; --config=FILE.yaml):"]
    for name, value in defaults.items():
        lines.append(f"  --{name.lower():<22} {json.dumps(value, default=str):<28} {comments.get(name, '')}")
    return "\n".join(lines)


def require_ranges(cfg: dict, ranges: dict[str, tuple[float | None, float | None]]) -> None:
    """Refuse a setting outside its closed range ``(low, high)`` (None: unbounded) with one line naming
    it: a negative SEED was a traceback, a negative TOP_CLASSES a Python slice."""
    for name, (low, high) in ranges.items():
        value = cfg.get(name)
        if value is None or ((low is None or value >= low) and (high is None or value <= high)):
            continue
        bound = (f"in [{low:g}, {high:g}]" if low is not None and high is not None
                 else f">= {low:g}" if low is not None else f"<= {high:g}")
        raise UserError(f"{name} must be {bound}, got {value}")


def quit_now_if_threads_linger(code: int) -> None:
    """Exit at once when worker threads are still running (a second Ctrl-C while stage 4 waits for
    the requests in flight): Python would join them first, minutes against a hung server.
    Everything the stage keeps is already written atomically, line by line."""
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
                 and not t.daemon]
    if lingering:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cli(main: Callable[..., Any], namespace: dict, argv: list[str] | None = None) -> None:
    """Entry point for a script's ``__main__`` guard: parse argv, run ``main``, map errors.

    A :class:`UserError` (bad input, missing file, offline download) prints one line
    and exits with code 2; Ctrl-C exits with 130.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = module_constants(namespace)
    try:
        overrides, wants_help = parse_argv(argv)
        if wants_help:
            source = inspect.getsource(sys.modules[namespace["__name__"]])
            print(help_text(namespace.get("__doc__"), defaults, constant_comments(source)))
            return
        make_config(defaults, overrides)  # validate before any work starts
        result = main(**overrides)
    except UserError as exc:
        script = Path(namespace.get("__file__", "script")).name
        print(f"{script}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        quit_now_if_threads_linger(130)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 143:  # SIGTERM (distributed.exit_on_sigterm): say so, as Ctrl-C does
            print("terminated", file=sys.stderr)
            quit_now_if_threads_linger(143)
        raise
    except BrokenPipeError:  # `... --json=True | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:  # the environment (permissions, a full disk, a file where a folder goes): one line
        script = Path(namespace.get("__file__", "script")).name
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{script}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
