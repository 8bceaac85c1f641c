"""A strict YAML loader for job files.

`yaml.safe_load` blocks code execution but keeps YAML 1.1's surprises: duplicate keys silently keep
the last value, `NO` becomes False, `0755` becomes 493, aliases can expand into a "billion laughs".
This loader accepts plain data only:

- no anchors, aliases, merge keys (`<<`) or explicit tags;
- duplicate keys are errors;
- scalars resolve as in YAML 1.2's core schema, narrowed further: `true`/`false`, `null`/`~`, decimal
  integers without leading zeros, decimal floats; every other plain scalar is a *string*, so `NO`,
  `on`, `0755` reach the schema as strings and fail a bool/int field there with a clear message;
- bounded size and nesting depth, UTF-8 only, no BOM or NUL.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32


class JobFileError(Exception):
    """One or more problems with a job file; `problems` holds one message each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _StrictResolver(yaml.resolver.BaseResolver):
    pass


_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
# A float needs a dot or an exponent, and no leading zero: "0755" and "1.10.2" stay strings.
_FLOAT = re.compile(
    r"^[-+]?(?:(?:(?:0|[1-9][0-9]*)\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
    r"|(?:0|[1-9][0-9]*)[eE][-+]?[0-9]+)$"
)
_NAN_INF = re.compile(r"^(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")

_StrictResolver.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))
_StrictResolver.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|)$"), ["~", "n", ""])
_StrictResolver.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_StrictResolver.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_StrictResolver.add_implicit_resolver("tag:yaml.org,2002:float", _NAN_INF, list("-+."))


class _StrictLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    yaml.constructor.SafeConstructor,
    _StrictResolver,
):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _StrictResolver.__init__(self)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise yaml.MarkedYAMLError(
                None, None, "aliases (*name) are not allowed in job files", _mark(event)
            )
        if isinstance(event, ScalarEvent | CollectionStartEvent):
            if event.anchor is not None:
                raise yaml.MarkedYAMLError(
                    None, None, "anchors (&name) are not allowed in job files", _mark(event)
                )
            implicit_scalar = isinstance(event, ScalarEvent) and event.tag in (None, "!")
            if event.tag is not None and not implicit_scalar and event.tag != "!":
                raise yaml.MarkedYAMLError(
                    None, None, f"explicit YAML tags ({event.tag}) are not allowed in job files", _mark(event)
                )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.MarkedYAMLError(None, None, f"nesting deeper than {MAX_DEPTH} levels", _mark(event))
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or key_node.value == "<<":
                raise yaml.MarkedYAMLError(
                    None, None, "merge keys (<<) are not allowed in job files", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.MarkedYAMLError(
                    None, None, f"mapping keys must be strings, got {key!r}", key_node.start_mark
                )
            if key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=True)


def _mark(event: Any) -> Any:
    return event.start_mark


def _format_yaml_error(source: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = "; ".join(filter(None, (exc.context, exc.problem))) or "invalid YAML"
        return f"{where}: {problem}"
    return f"{source}: {exc}"


def decode(data: bytes, source: str) -> str:
    if len(data) > MAX_BYTES:
        raise JobFileError(
            [f"{source}: file is {len(data)} bytes, over the {MAX_BYTES}-byte cap for job files"]
        )
    if data.startswith(b"\xef\xbb\xbf"):
        raise JobFileError([f"{source}: starts with a byte-order mark; save it as UTF-8 without BOM"])
    if b"\x00" in data:
        raise JobFileError([f"{source}: contains NUL bytes; a job file is UTF-8 text"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError([f"{source}: not valid UTF-8 (byte {e.start}); save it as UTF-8"]) from e


def load_mapping(data: bytes, source: str) -> dict[str, Any]:
    """Parse one YAML document that must be a mapping; raise JobFileError otherwise."""
    text = decode(data, source)
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise JobFileError([f"{source}: the file is empty; a job file is a YAML mapping"])
        obj = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise JobFileError([_format_yaml_error(source, e)]) from e
    except RecursionError as e:
        raise JobFileError([f"{source}: nesting too deep"]) from e
    finally:
        loader.dispose()
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        raise JobFileError(
            [
                f"{source}: the top level is a {kind}; a job file is a YAML mapping "
                "(name: ..., model: ..., ...)"
            ]
        )
    return obj
