"""Typed node parameters, declared once per kind with pydantic.

The same declaration parses `KEY=VALUE` on the command line, validates topology files, answers
`nbdfabric kinds KIND`, produces JSON Schema, and checks live changes from gRPC Configure.
Spellings follow nbdkit: sizes `1G`/`512K`, durations `10ms`/`2s`, rates `10%`, errnos `EIO`.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .values import (
    _errno_name,
    parse_duration,
    parse_errno,
    parse_fraction,
    parse_size,
    shown_input,
    whole_number,
)

Size = Annotated[int, BeforeValidator(parse_size), Field(json_schema_extra={"format": "size"})]
Duration = Annotated[
    float, BeforeValidator(parse_duration), Field(json_schema_extra={"format": "duration"})
]
Fraction = Annotated[
    float, BeforeValidator(parse_fraction), Field(json_schema_extra={"format": "rate"})
]
Errno = Annotated[
    int,
    BeforeValidator(parse_errno),
    PlainSerializer(_errno_name, return_type=str),
    Field(json_schema_extra={"format": "errno"}),
]


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


#: The values of a param given more than once (`header=A header=B`); one value is a list of one.
Many = Annotated[
    list[str],
    BeforeValidator(_listed),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]


#: `path=True` on a param (param, live, repeated): its values name files or directories of
#: the machine the node runs on, which a container sees elsewhere (orchestrator.argv maps them
#: for compose and Kubernetes; the local backend runs nodes in the topology file's directory).


def _extra(path: bool, **extra: Any) -> dict[str, Any]:
    """Field kwargs marking a param: none at all for a plain one (an explicit
    json_schema_extra would hide its type's own, such as Size's `format`)."""
    extra = {**extra, "path": True} if path else extra
    return {"json_schema_extra": extra} if extra else {}


def live(default: Any = None, description: str = "", path: bool = False, **kwargs: Any) -> Any:
    """A param that can be changed while the node serves (gRPC Configure, `nbdfabric set`)."""
    return Field(default, description=description, **_extra(path, live=True), **kwargs)


def param(default: Any = ..., description: str = "", path: bool = False, **kwargs: Any) -> Any:
    """A param fixed for the node's lifetime."""
    return Field(default, description=description, **_extra(path), **kwargs)


def repeated(description: str = "", follows: str | None = None, path: bool = False) -> Any:
    """A param (a list, such as `Many`) that may be given several times, or not at all.

    With `follows`, it is a setting of nbdkit's positional kind: on the command line each value
    applies to the values of the repeated param `follows` given after it, up to the next one
    (`mbr-id=0x82 swap.img mbr-id=default root.img`), and the param holds one value per value
    of `follows` (parse_params fills in `default` where none applied yet: its items must take
    that word). A mapping (a topology) gives one value for all, or a list of one per value."""
    extra: dict[str, Any] = {"repeat": True}
    if follows is not None:
        extra["follows"] = follows
    return Field(default_factory=list, description=description, **_extra(path, **extra))


def secret(default: Any = None, description: str = "") -> Any:
    """A param fixed for the node's lifetime whose value is never shown (gRPC info, `ctl`)."""
    return Field(default, description=description, json_schema_extra={"secret": True})


#: nbdkit's rule for a key (nbdkit(1)): a word whose part before '=' is not one is a value.
CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*", re.ASCII)
#: Where a kind that passes unknown keys on keeps the values given without a key after its
#: magic one (sh: for its script's magic_config_key, as nbdkit's `config "" VALUE` when the
#: script names none).
BARE = ""


def passes_on(model: type[Params]) -> bool:
    """A kind whose params model allows keys it does not declare (`extra="allow"`): sh and eval
    hand them to their script's `config` method, as nbdkit does. parse_params keeps them, in
    the order first given, a key given several times as a list of its values; bare words after
    the magic one go under BARE."""
    return model.model_config.get("extra") == "allow"


class Params(BaseModel):
    """Base of every kind's parameters: dashed names on the outside, unknown keys refused."""

    #: Other spellings of its params that a before-validator maps onto them (nbdkit's
    #: `rdelay` for `delay-read`): keys it takes besides its fields' (`nbdfabric chain`
    #: gives each KEY=VALUE to the layer that takes it).
    spellings: ClassVar[tuple[str, ...]] = ()
    #: Of a kind that passes unknown keys on (passes_on): bare words after the magic one are
    #: kept under BARE too (sh, for its script's magic_config_key), not refused.
    takes_bare_words: ClassVar[bool] = False

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=lambda name: name.replace("_", "-"),
        populate_by_name=True,
        validate_assignment=True,
        frozen=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _ascii_whole_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and info.field_name in _plain_ints(cls):
            return whole_number(value)  # pydantic's int() would take `1_0` or `٣`
        return value

    def shown(self) -> dict[str, Any]:
        """The values as JSON data for people to see: secret params masked."""
        values = self.model_dump(by_alias=True, mode="json")
        for entry in field_info(type(self)):
            if entry["secret"] and values.get(entry["name"]) is not None:
                values[entry["name"]] = "***"
        return values


@functools.cache
def _plain_ints(model: type[Params]) -> frozenset[str]:
    """The fields typed `int` (or `int | None`) with no parser of their own (Size, Errno)."""
    names = set()
    for name, f in model.model_fields.items():
        types = set(typing.get_args(f.annotation)) - {type(None)} or {f.annotation}
        parsed = any(isinstance(m, BeforeValidator) for m in f.metadata)
        if types == {int} and not parsed:
            names.add(name)
    return frozenset(names)


class ParamError(ValueError):
    """A bad or unknown parameter; the message names the key and what it accepts."""


def field_info(model: type[Params]) -> list[dict[str, Any]]:
    """One entry per param: name, type, default, live, help (for `kinds` and gRPC info)."""
    schema = model.model_json_schema(by_alias=True)
    props = schema.get("properties", {})
    out = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        prop = props.get(key, {})
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        required = f.is_required()
        out.append(
            {
                "name": key,
                # A repeated param's values: strings, unless its schema says ("x-item").
                "type": prop.get("x-item", "string") if extra.get("repeat") else _type_name(prop),
                "default": None if required or extra.get("repeat") else _jsonable(f.default),
                "required": f.is_required(),
                "live": bool(extra.get("live")),
                "secret": bool(extra.get("secret")),
                "repeat": bool(extra.get("repeat")),
                "follows": extra.get("follows"),
                "path": bool(extra.get("path")),
                "help": f.description or "",
            }
        )
    return out


def _type_name(prop: dict[str, Any]) -> str:
    if "format" in prop and prop["format"] in ("size", "duration", "rate", "errno"):
        return str(prop["format"])
    if "enum" in prop:
        return "|".join(str(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type_name(p) for p in prop["anyOf"] if p.get("type") != "null")
    return str(prop.get("type", "string"))


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _accepts(model: type[Params], key: str) -> str:
    for entry in field_info(model):
        if entry["name"] == key:
            return entry["type"]
    return "a string, or a list of strings" if passes_on(model) else "?"


#: Longest rendering of a bad value in an error message (a 5000-digit size is not echoed whole).


def _not_utf8(value: Any) -> bool:
    """Text with lone surrogates (argv bytes that are not UTF-8, YAML's "\\udcff")."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list | tuple):
        return any(_not_utf8(v) for v in value)
    if isinstance(value, dict):
        return any(_not_utf8(k) or _not_utf8(v) for k, v in value.items())
    return False


def validate_model(model: type[Params], values: dict[str, Any]) -> Params:
    """`model.model_validate(values)` for every caller (command line, topology, Configure).

    pydantic-core cannot carry an error message holding text that is not UTF-8: a validator
    that quotes such a value (ip's `allow=`) made model_validate raise UnicodeEncodeError
    instead of a ValidationError. Such values are refused first, by key, as ValidationErrors.
    """
    bad = [k for k, v in values.items() if _not_utf8(v)]
    if bad:
        raise ValidationError.from_exception_data(
            model.__name__,
            [
                {
                    "type": PydanticCustomError("not_utf8", "the value is not valid UTF-8 text"),
                    "loc": (k,),
                    "input": values[k],
                }
                for k in bad
            ],
        )
    return model.model_validate(values)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`, did you mean 'size'?` for a near miss of one of `choices` (a typo), else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f", did you mean '{close[0]}'?" if close else ""


def param_key(loc: tuple[int | str, ...]) -> str:
    """The param an error's location names: `alignment` for an item (`alignment.0`) too."""
    return ".".join(str(p) for p in loc if not isinstance(p, int))


def format_error(kind: str, model: type[Params], exc: ValidationError) -> str:
    lines = []
    names = ", ".join(e["name"] for e in field_info(model)) or "(none)"
    for err in exc.errors():
        key = param_key(err["loc"]) or "?"
        if not err["loc"]:  # a check of several params together (a model validator)
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{kind}: {msg}")
        elif err["type"] == "extra_forbidden":
            hint = did_you_mean(key, (e["name"] for e in field_info(model)))
            lines.append(f"{kind}: unknown parameter '{key}'{hint} (accepts: {names})")
        elif err["type"] == "missing":
            lines.append(f"{kind}: parameter '{key}' is required")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(
                f"{kind}: bad value {shown_input(err.get('input'))} for '{key}' "
                f"(accepts {_accepts(model, key)}): {msg}"
            )
    return "\n".join(lines)


def parse_params(
    kind: str, model: type[Params], args: list[str] | dict[str, Any], magic: str | None = None
) -> Params:
    """Build a kind's params from `KEY=VALUE` words (or a mapping), nbdkit style.

    A word without '=' (or whose part before it is no key: `./a=b.img`) is the kind's magic
    param (`memory 1G`, `file disk.img`, `ondemand dir=d 1G`); when the magic param may be
    repeated, every such word is one of its values (`split a b c`).
    A param that `follows` another (see repeated()) applies to the values of that one after it.
    """
    values: dict[str, Any] = {}
    if isinstance(args, dict):
        values = {str(k): v for k, v in args.items()}
    else:
        info = field_info(model)
        repeatable = {e["name"] for e in info if e["repeat"]}
        follows = {e["name"]: e["follows"] for e in info if e["follows"]}
        setting: dict[str, str] = {}  #: the followers' values in force, as the words go
        unused: dict[str, str] = {}  #: ... that no value of their leader came after (yet)
        others = passes_on(model)
        declared = {e["name"] for e in info} | set(model.model_fields)  # by name too
        for i, word in enumerate(args):
            key, sep, value = word.partition("=")
            if sep and key not in declared and not CONFIG_KEY.fullmatch(key):
                sep = ""  # `./a=b.img` is a value, as nbdkit reads it
            if not sep:
                # As nbdkit: a bare word anywhere is the magic param (`ondemand dir=d 1G`;
                # twice is refused below), but for a kind whose later bare words are its
                # script's (sh).
                if magic and (i == 0 or magic in repeatable or not model.takes_bare_words):
                    key, value = magic, word
                elif others and model.takes_bare_words:
                    key, value = BARE, word
                else:
                    raise ParamError(f"{kind}: expected KEY=VALUE, got {word!r}")
            if others and key not in declared:
                given = values.get(key)
                values[key] = value if given is None else [*_as_list(given), value]
                continue
            if key in follows:
                if key in unused:  # replaced before it applied to anything: checked still
                    _check_item(kind, model, key, unused[key])
                setting[key] = unused[key] = value
                continue
            if key in repeatable:
                values.setdefault(key, []).append(value)
                for name, leader in follows.items():
                    if leader == key:
                        values.setdefault(name, []).append(setting.get(name, "default"))
                        unused.pop(name, None)
                continue
            if key in values:
                raise ParamError(f"{kind}: parameter '{key}' given twice")
            values[key] = value
        for name in follows:  # never given: the param's own default (no list of "default"s)
            if name not in setting:
                values.pop(name, None)
        for name, value in unused.items():  # applies to nothing, but is checked (as nbdkit)
            _check_item(kind, model, name, value)
    try:
        return validate_model(model, values)
    except ValidationError as exc:
        raise ParamError(format_error(kind, model, exc)) from None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _check_item(kind: str, model: type[Params], name: str, value: str) -> None:
    """Validate `value` as one item of the list param `name` (ParamError if it is bad)."""
    f = next(f for attr, f in model.model_fields.items() if (f.alias or attr) == name)
    try:
        kind_of: Any = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        TypeAdapter(kind_of).validate_python([value])
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ParamError(
            f"{kind}: bad value {shown_input(value)} for '{name}' "
            f"(accepts {_accepts(model, name)}): {msg}"
        ) from None


def update_params(kind: str, params: Params, changes: dict[str, Any]) -> Params:
    """A copy of `params` with `changes` applied and validated; live-only is checked by callers."""
    merged = params.model_dump(by_alias=True)
    merged.update(changes)
    return parse_params(kind, type(params), merged)


def live_names(model: type[Params]) -> set[str]:
    return {e["name"] for e in field_info(model) if e["live"]}
