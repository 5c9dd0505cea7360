"""Problems and completions files, validated on load.

Both are JSON Lines (one object per line) or one JSON document (an array of objects, or a single,
possibly pretty-printed, object). Whatever is wrong with a file stops the load with one
`InputError` naming the file, the line (or array index), the field and what was expected; a UTF-8
byte-order mark is accepted with a warning. Strings are taken as they are: a completion that is not
encodable as UTF-8 (a lone surrogate) is the sample's failure, reported by the sandbox, not the
file's.
"""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path
from typing import Any, Iterable

EDITIONS = ("2015", "2018", "2021", "2024")


class InputError(ValueError):
    """A problems or completions file that cannot be used as it is; the message says where and why."""


def read_json_rows(path: str | Path) -> list[tuple[str, dict]]:
    """The objects of a JSONL or JSON file, each with where it was (`file:line` or `file[index]`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    if raw.startswith(codecs.BOM_UTF8):
        print(f"warning: {path} starts with a UTF-8 byte-order mark; ignoring it", file=sys.stderr)
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start} cannot be decoded)") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty; expected JSON Lines (one object per line) or a JSON array of "
                         "objects")
    try:
        document = json.loads(text)
    except ValueError:
        document = None  # JSON Lines with more than one row, or broken
    if document is not None:
        rows = ([(f"{path}[{i}]", row) for i, row in enumerate(document)] if isinstance(document, list)
                else [(f"{path}:1", document)])
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except ValueError as e:
                raise InputError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno}); expected one JSON "
                                 "object per line") from None
    if not rows:
        raise InputError(f"{path}: no rows; expected at least one JSON object")
    for where, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {json_type(row)}")
    return rows


def json_type(value: Any) -> str:
    names = {str: "a string", bool: "true/false", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def text_field(row: dict, where: str, key: str, required: bool = True, non_empty: bool = False) -> str | None:
    """`row[key]` as a string (None where it is optional and absent)."""
    if key not in row or row[key] is None:
        if required:
            raise InputError(f"{where}: missing field '{key}' (a string)")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {json_type(value)}")
    if non_empty and not value.strip():
        raise InputError(f"{where}: field '{key}' is empty")
    return value


def text_list_field(row: dict, where: str, key: str, non_empty_items: bool = False) -> list[str] | None:
    """`row[key]` as a list of strings, None where absent (a bare string is refused, not split)."""
    if key not in row or row[key] is None:
        return None
    value = row[key]
    if not isinstance(value, list):
        raise InputError(f"{where}: field '{key}' must be a list of strings, got {json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InputError(f"{where}: field '{key}'[{i}] must be a string, got {json_type(item)}")
        if non_empty_items and not item:
            raise InputError(f"{where}: field '{key}'[{i}] is an empty string, which would cut everything")
    return value


def edition_field(row: dict, where: str) -> str:
    value = row.get("edition", "2021")
    if str(value) not in EDITIONS or isinstance(value, bool):
        raise InputError(f"{where}: field 'edition' must be one of {', '.join(EDITIONS)}, got {value!r}")
    return str(value)


def unique_names(named: Iterable[tuple[str, str]], what: str) -> None:
    """Refuse a second row with a name already seen, naming both places."""
    seen: dict[str, str] = {}
    for where, name in named:
        if name in seen:
            raise InputError(f"{where}: duplicate {what} name {name!r} (first at {seen[name]})")
        seen[name] = where


def read_completions(path: str | Path, known: Iterable[str]) -> dict[str, list[str]]:
    """Completions per problem from rows {"name", "completion"} (one sample each) or {"name",
    "completions": [...]}; every name must be one of `known`."""
    known = set(known)
    completions: dict[str, list[str]] = {}
    for where, row in read_json_rows(path):
        name = text_field(row, where, "name", non_empty=True)
        if name not in known:
            raise InputError(f"{where}: no problem named {name!r} in the problem set")
        if "completions" in row:
            texts = text_list_field(row, where, "completions")
            if texts is None:
                raise InputError(f"{where}: field 'completions' must be a list of strings, got null")
        elif "completion" in row:
            texts = [text_field(row, where, "completion")]
        else:
            raise InputError(f"{where}: missing field 'completion' (a string) or 'completions' (a list of strings)")
        completions.setdefault(name, []).extend(texts)
    return completions
