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


# ---- section 8, the device a guest drives: its tables against the code -----------------------
def _device() -> str:
    return DOC[DOC.index("## 8. The device a guest drives"):DOC.index("## 9. Kinds")]


def _rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row is `header`."""
    lines = text[text.index(header):].splitlines()[2:]
    out = []
    for line in lines:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def test_the_command_table_is_the_one_the_gpu_and_parser_use():
    from nodes.hw import cmd
    rows = _rows(_device(), "| command | opcode | length | what the gpu does |")
    assert len(rows) == len(cmd.TABLE)
    for (name, opcode, length, what), c in zip(rows, cmd.TABLE):
        engines = "" if c.engines == cmd.ALL else " (" + ", ".join(sorted(c.engines)) + ")"
        assert name == c.name + engines
        assert int(opcode, 16) == c.opcode, name
        if c.const_len:
            assert length == str(c.const_len), name
        elif c.fixed:
            assert length == f"{c.fixed} (length field)", name
        else:
            assert length == f"2 to {(1 << c.len_bits) + 1}", name
        assert (what == "no effect") == (c.run == "nop") and (what == "hangs the context") == (c.run == "hang"), name
    # the flag bits the text gives
    text = _device()
    for bit, val in (("bit 22 GGTT address", cmd.USE_GGTT), ("bit 21 a qword", cmd.STORE_QWORD),
                     ("bit 18 inline operand", cmd.ATOMIC_INLINE_DATA), ("bit 24 global GTT", cmd.PC_GLOBAL_GTT),
                     ("bit 23 a register write", cmd.PC_MMIO_WRITE), ("dword 1 bit 2 GGTT", cmd.FLUSH_DW_USE_GGTT)):
        assert bit in text and val == 1 << int(bit.split("bit ")[1].split()[0]), bit
    for op, code in cmd.ATOMIC_OPS.items():
        assert f"{code:#04x} {op}" in text, op
    assert f"at most {cmd.BATCH_MAX >> 10} KiB" in text
    from nodes.gpu.engine import CMD_BUDGET
    from nodes.mediator.cmd_parser import BATCHES_MAX
    assert f"{CMD_BUDGET:,}".replace(",", " ") + " commands" in text
    assert f"at most {BATCHES_MAX} of them in one workload" in text


def test_the_command_access_list_is_the_register_tables():
    from nodes.mediator import handlers
    text = _device()
    block = text[text.index("Registers a command may name"):text.index("#### 8.6")]
    listed = set()
    for item in re.findall(r"0x[0-9a-f]+(?:-0x[0-9a-f]+)?", block):
        a, _, b = item.partition("-")
        listed |= set(range(int(a, 16), int(b or a, 16) + 4, 4))
    assert listed == {o for o, i in handlers.MMIO.items() if i.cmd}
    assert all(f"{r:#x}" in text.lower() for r in handlers.SRM_LRM_ALLOWED)


def test_engines_registers_and_context_dwords_are_the_hardware_facts():
    from nodes.hw import lrc, regs
    text = _device()
    engines = _rows(text, "| engine | base | GDRST bit | interrupt bits |")
    assert [r[0] for r in engines] == ["rcs", "vcs", "vecs", "bcs"]
    grdom = {e: bit for bit, e in regs.GRDOM_ENGINES.items()}
    for name, base, gdrst, irq in engines:
        assert int(base, 16) == regs.ENGINES[name]
        assert 1 << int(gdrst) == grdom[name]
        bank, shift = regs.ENGINE_IRQ[name]
        assert irq == f"GT bank {bank}, bits {shift + 15}:{shift}"
    ctx = {int(r[0].split(",")[0], 16): r[1] for r in _rows(text, "| dword | what |")}
    assert ctx[lrc.CTX_RING_HEAD].startswith("RING_HEAD") and f"{lrc.RING_HEAD_OFF_MASK:#X}"[2:] in ctx[lrc.CTX_RING_HEAD]
    assert ctx[lrc.CTX_RING_TAIL].startswith("RING_TAIL") and f"{lrc.RING_TAIL_OFF_MASK:#X}"[2:] in ctx[lrc.CTX_RING_TAIL]
    assert ctx[lrc.CTX_RING_START].startswith("RING_START") and ctx[lrc.CTX_RING_CTL].startswith("RING_CTL")
    assert lrc.ring_ctl(4 * 4096) == (3 << 12) | 1      # "bits 20:12 the size in pages minus 1"
    for n in range(4):
        assert ctx[lrc.CTX_PDP_UDW[n]].startswith(f"PDP{n} high"), n
    assert lrc.CTX_STATE_DWORDS - 1 == 0x33 and "dwords 0 to 0x33" in text
    ring = {r[0]: r[1] for r in _rows(text, "| register | offset | what |")}
    for name, off in (("RING_HWS_PGA", regs.RING_HWS_PGA), ("GFX_MODE", regs.RING_MODE),
                      ("EXECLIST_STATUS", regs.RING_EXECLIST_STATUS), ("CSB", regs.RING_CSB),
                      ("CSB pointer", regs.RING_CSB_PTR)):
        assert ring[name] == f"engine + {off:#X}".replace("0X", "0x"), name
    assert ring["GDRST"] == f"{regs.GDRST:#X}".replace("0X", "0x")
    assert f"{regs.csb_ptr_guest_reset():#010X}".replace("0X", "0x") in text
    assert f"{regs.gt_isr(0):#x}" in text.lower() and f"{regs.MASTER_IRQ:#x}" in text.lower()
    # gen8_irq_map as the text says it: each half of GT banks 0 and 1 its own master bit, banks
    # 2 and 3 their low half
    flat = " ".join(text.split())
    assert ("bit 0 for GT bank 0 bits 15:0 pending (IIR & IER), bit 1 for bank 0 bits 31:16, bit 2 "
            "and 3 for bank 1's halves, bit 4 for bank 2, bit 6 for bank 3") in flat
    assert regs.GT_MASTER_MAP == ((0, 0xFFFF, 1), (0, 0xFFFF0000, 2), (1, 0xFFFF, 4),
                                  (1, 0xFFFF0000, 8), (2, 0xFFFF, 16), (3, 0xFFFF, 64))
