"""PROTOCOL.md and the schemas in nodes/wire/schema.py describe the same protocol: every kind
is there with the same senders, payload fields and types, and reply."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodes.wire.codec import MAX_FRAME, PROTOCOL_VERSION
from nodes.wire.schema import KINDS

DOC = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
ROW = re.compile(r"^\|\s*([a-z_]+)\s*\|\s*([a-z0-9_\[\],]+)\s*\|\s*(required|optional)\s*\|")


def sections() -> dict[str, str]:
    parts = re.split(r"^### ", DOC, flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts}


def table_after(text: str, label: str) -> list[tuple[str, str, bool]] | None:
    """The field rows of the table that follows `label:` (None if the label says no table)."""
    at = text.index(f"\n{label}:")
    rest = text[at:].split("\n")[2:]         # after the label line
    rows = []
    for line in rest:
        if not line.strip() and rows:
            break
        m = ROW.match(line)
        if m:
            rows.append((m.group(1), m.group(2), m.group(3) == "optional"))
        elif line.startswith(("Reply:", "Errors:")) or line.startswith("###"):
            break
    return rows


def test_every_kind_is_documented_and_nothing_else():
    assert set(sections()) == set(KINDS)
    assert f"version {PROTOCOL_VERSION}" in DOC.splitlines()[0]
    assert f"{MAX_FRAME >> 20} MiB" in DOC


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_section_matches_its_schema(name):
    kind, text = KINDS[name], sections()[name]
    sent_by = next(line for line in text.splitlines() if line.startswith("Sent by:"))
    documented = set(re.findall(r"([a-z]+) → ([a-z]+)", sent_by))
    assert documented == set(kind.routes), f"{name}: Sent by"
    payload = next(line for line in text.splitlines() if line.startswith("Payload:"))
    if name == "REPLY":
        assert kind.fields is None
    elif kind.fields is None:
        assert payload == "Payload: nil.", name
    else:
        want = [(f.name, f.type, f.optional) for f in kind.fields]
        assert table_after(text, "Payload") == want, f"{name}: payload fields"
    reply = next(line for line in text.splitlines() if line.startswith("Reply:"))
    if kind.reply is None:
        assert reply.startswith("Reply: none"), name
    elif isinstance(kind.reply, tuple):
        want = [(f.name, f.type, f.optional) for f in kind.reply]
        assert table_after(text, "Reply") == want, f"{name}: reply fields"
    else:
        assert reply.startswith(f"Reply: `{kind.reply}`"), f"{name}: reply type"
