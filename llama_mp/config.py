"""One way to configure a command: a dataclass of options, a YAML file over its defaults, command-line flags over both.

    @dataclass
    class Salmon:
        max_prompts: int = 48
    @dataclass
    class Options:
        lr: float = 1e-5                                # YAML `lr: 1e-4` (a text to YAML 1.1) reads as the number
        datasets: list[str] = field(default_factory=list)   # YAML [a, b]; flag --datasets a b
        scorer_ckpt: Optional[str] = None               # YAML null; flag --scorer_ckpt null
        salmon: Salmon = field(default_factory=Salmon)  # a YAML section `salmon: {max_prompts: 8}`;
                                                        # flag --salmon.max_prompts 8
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="YAML of options (every key is also a flag)")
    args, options = parse_config(parser, Options)       # class defaults <- YAML file <- flags

Several classes may share one file and one command line (a trainer's TrainConfig and its task's options):
`args, train_config, options = parse_config(parser, TrainConfig, Options)`; a name both classes have is one key (and
one flag) given to both. A value's type is the field's annotation: int (an int: 2.5 is refused, never truncated),
PositiveInt (an int >= 1), float (an int, a float, or a text that reads as one), str, bool (a YAML boolean; a flag
true or false, or alone for true: `--no_prefix_reuse`), Literal["a", "b"] (one of the texts), Optional[X] (YAML null;
a flag null), list[X] (a YAML list; a flag takes any number of values and may be repeated: `--stop A --stop B`),
dict[str, X] (a mapping; as a flag, a YAML mapping text), Arg (an element of a list of command-line arguments: a text
or a number, kept as text; argparse takes no flag value that starts with '-', so such a list goes in the YAML file)
and a nested dataclass (a YAML mapping section; flags --section.key). A field's `metadata={"help": ...}` is its flag's
help. A key that no class knows, at any level, is refused, and so is a value of the wrong type: a ValueError of one
line naming the file (or the flag) and the key,
`run.yaml: unknown keys ['salmon.max_promts'] (did you mean salmon.max_prompts?)`,
`run.yaml: salmon.max_prompts must be int, got 2.5`, `--lr must be float, got 'fast'`. An option a command cannot run
without is Optional (None) in its class and checked with `require`, so that it may come from the file or the flag.

Only the flags that say how to run, not what to compute, stay outside the classes: --config, --resume (trainers),
--overwrite (replace a finished output), a driver's run directory (--workdir, --run_dir), --dry_run, --fresh.
"""

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Literal, Optional, Union

from llama_mp.jsonl import read_yaml


class PositiveInt(int):
    """The annotation of a count that must be at least 1 (a batch size, a number of prompts): int, and >= 1."""


class Arg(str):
    """The element type of a list of command-line arguments passed on to another command (list[Arg]): YAML may write
    one as a text or a number (`[--lora_rank, 16]`); it is kept as its text."""


def _fields(cls) -> list[tuple[str, Any]]:
    """(name, annotation) of each field of a config dataclass, annotations resolved (typing.get_type_hints)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _unwrap(hint) -> tuple[Any, bool]:
    """(X, True) for Optional[X], (hint, False) otherwise."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {hint} (only Optional[X] of unions)")
        return args[0], True
    return hint, False


def _is_section(hint) -> bool:
    return dataclasses.is_dataclass(hint) and isinstance(hint, type)


def type_name(hint) -> str:
    """How an annotation reads in an error: int, float or null, a list of str, a mapping, ..."""
    inner, optional = _unwrap(hint)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        name = ("a list of arguments (texts or numbers)" if args and args[0] is Arg
                else f"a list of {type_name(args[0])}" if args else "a list")
    elif origin is dict or inner is dict:
        name = f"a mapping of {type_name(args[1])}" if args and args[1] is not Any else "a mapping"
    elif _is_section(inner):
        name = "a mapping (section)"
    elif origin is Literal:
        name = "one of " + ", ".join(str(a) for a in args)
    elif inner is Arg:
        name = "a text or a number"
    elif inner is PositiveInt:
        name = "a positive int"
    elif inner in (int, float, str, bool):
        name = inner.__name__
    else:
        raise TypeError(f"unsupported config annotation {hint}")
    return f"{name} or null" if optional else name


def _bad(where: str, key: str, hint, value) -> ValueError:
    return ValueError(f"{where + ': ' if where else ''}{key} must be {type_name(hint)}, got {value!r}")


def _from_yaml(value, hint, key: str, where: str):
    """A YAML value as the annotation's type, strictly (no truncation, no text for a bool, ...)."""
    inner, optional = _unwrap(hint)
    if value is None:
        if optional:
            return None
        raise _bad(where, key, hint, value)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(where, key, hint, value)
        return [_from_yaml(v, args[0] if args else Any, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _bad(where, key, hint, value)
        kind = args[1] if args else Any
        return {k: _from_yaml(v, kind, f"{key}.{k}", where) for k, v in value.items()}
    if inner is Any:
        return value
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _bad(where, key, hint, value)
    if _is_section(inner):
        if not isinstance(value, dict):
            raise _bad(where, key, hint, value)
        return config_values(value, where, inner, prefix=f"{key}.")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is bool and isinstance(value, bool):
        return value
    if inner is int and number and isinstance(value, int):
        return value
    if inner is PositiveInt and number and isinstance(value, int) and value >= 1:
        return value
    if inner is float:
        if number:
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a text
            try:
                return float(value)
            except ValueError:
                pass
    if inner is str and isinstance(value, str):
        return value
    if inner is Arg and (isinstance(value, str) or number):
        return str(value)
    type_name(hint)  # an unsupported annotation is the programmer's error (TypeError), not the file's
    raise _bad(where, key, hint, value)


def _from_text(text, hint, flag: str):
    """A flag's text (a list of texts for a list field) as the annotation's type, strictly."""
    inner, optional = _unwrap(hint)
    if optional and text == "null":
        return None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        return [_from_text(t, args[0] if args else str, flag) for t in text]
    if origin is dict or inner is dict:
        import yaml
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError:
            raise _bad("", flag, hint, text) from None
        return _from_yaml(loaded, hint, flag, "")
    if origin is Literal:
        if text in args:
            return text
        raise _bad("", flag, hint, text)
    if inner is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise _bad("", flag, hint, text)
    if inner in (int, float, PositiveInt):
        try:
            value = (int if inner is PositiveInt else inner)(text)
        except ValueError:
            raise _bad("", flag, hint, text) from None
        if inner is PositiveInt and value < 1:
            raise _bad("", flag, hint, text)
        return value
    if inner in (str, Arg):
        return str(text)
    raise TypeError(f"unsupported config annotation {hint}")


def _known(classes) -> dict:
    known = {}
    for cls in classes:
        for name, hint in _fields(cls):
            known.setdefault(name, hint)
    return known


def config_values(mapping: dict, where: str, *classes, prefix: str = "") -> dict:
    """The keys given in `mapping` (a YAML file's, or a section of one), each checked and converted to its field's
    type; a key that none of `classes` has is refused. `where` names the file in the errors."""
    known = _known(classes)
    unknown = sorted(f"{prefix}{k}" for k in mapping if k not in known)
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, [prefix + n for n in known], 1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{where}: unknown keys {unknown}{hint}")
    return {k: _from_yaml(v, known[k], f"{prefix}{k}", where) for k, v in mapping.items()}


def read_config(yaml_path: Optional[str], *classes) -> dict:
    """The keys a YAML file gives (nothing when yaml_path is None or empty), checked as config_values does."""
    return config_values(read_yaml(yaml_path), yaml_path, *classes) if yaml_path else {}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_config_flags(parser: argparse.ArgumentParser, *classes, prefix: str = "") -> None:
    """One flag per field of each config dataclass (--section.key for a nested one); a name several classes have is
    one flag. A flag left out is None in the namespace: the YAML file's value, or the class's, stands."""
    seen = set()
    for cls in classes:
        hints = dict(_fields(cls))
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            hint, flag = hints[f.name], f"{prefix}{f.name}"
            inner, _ = _unwrap(hint)
            if _is_section(inner):
                add_config_flags(parser, inner, prefix=f"{flag}.")
                continue
            text = f"{type_name(hint)}, default {_default(f)!r}"
            comment = f.metadata.get("help")
            text = (f"{comment} ({text})" if comment else text).replace("%", "%%")
            if typing.get_origin(inner) is list:  # --stop A B and --stop A --stop B alike
                parser.add_argument(f"--{flag}", dest=flag, default=None, help=text, nargs="*", action="extend")
            elif inner is bool:  # --overwrite alone is --overwrite true
                parser.add_argument(f"--{flag}", dest=flag, default=None, help=text, nargs="?", const="true")
            else:
                parser.add_argument(f"--{flag}", dest=flag, default=None, help=text)


def flag_values(opts: argparse.Namespace, *classes, prefix: str = "") -> dict:
    """The config flags given on the command line, converted to their fields' types (sections as nested dicts)."""
    values = {}
    for name, hint in _known(classes).items():
        inner, _ = _unwrap(hint)
        if _is_section(inner):
            section = flag_values(opts, inner, prefix=f"{prefix}{name}.")
            if section:
                values[name] = section
            continue
        text = getattr(opts, f"{prefix}{name}", None)
        if text is not None:
            values[name] = _from_text(text, hint, f"--{prefix}{name}")
    return values


def build(cls, *layers: dict):
    """An instance of cls: its defaults, then each layer's keys in turn (a later layer wins; a section is merged key
    by key); the keys of the layers that cls lacks are left to the other classes."""
    kwargs = {}
    for name, hint in _fields(cls):
        given = [layer[name] for layer in layers if name in layer]
        if given:
            inner, _ = _unwrap(hint)
            kwargs[name] = build(inner, *given) if _is_section(inner) and given[-1] is not None else given[-1]
    return cls(**kwargs)


def load_configs(classes: tuple, opts: Optional[argparse.Namespace] = None, yaml_path: Optional[str] = None) -> tuple:
    """One instance per class: defaults <- the YAML file (every key known to some class) <- the flags given."""
    from_file = read_config(yaml_path, *classes)
    from_flags = flag_values(opts, *classes) if opts is not None else {}
    return tuple(build(cls, from_file, from_flags) for cls in classes)


def load_config(cls, opts: Optional[argparse.Namespace] = None, yaml_path: Optional[str] = None):
    """cls from its defaults, the YAML file (if any; a key cls lacks is refused) and the flags given."""
    return load_configs((cls,), opts, yaml_path)[0]


def require(options, *keys: str) -> None:
    """Fields a command cannot run without (Optional in its class, so that the YAML file may give them too)."""
    missing = [k for k in keys if getattr(options, k) in (None, "", [])]
    if missing:
        raise ValueError(f"--{missing[0]} is required (a flag, or a key of --config)")


def parse_config(parser: argparse.ArgumentParser, *classes, argv: Optional[list[str]] = None) -> tuple:
    """Add the classes' flags, parse the command line and load: (args, one instance per class). The YAML file is the
    parser's --config, when the command defines one (its default, help and required-ness are the command's)."""
    add_config_flags(parser, *classes)
    args = parser.parse_args(argv)
    return (args, *load_configs(classes, args, getattr(args, "config", None)))
