"""Reading the dashboards' JSON as Grafana does: their panels and queries, the rules of Grafana's
dashboard linter (checked with a real PromQL parser), and queries with the variables filled in
the way Grafana fills them for Prometheus."""
from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import promql_parser as pp

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DS_REFS = {"$datasource", "${datasource}"}
FILTERS = ("job", "instance", "vgpu")
# vgpu=~"$vgpu|" is the matcher of node-level series (no vgpu label): see bench/dashboards.py
VGPU_VALUES = {"$vgpu", "$vgpu|"}
# units Grafana knows (a subset of its list, as the linter checks them): a typo such as "sec" fails
UNITS = {"none", "short", "percent", "percentunit", "bytes", "decbytes", "bits", "ns", "µs", "ms", "s",
         "ops", "reqps", "rps", "wps", "iops", "cps", "opm", "hertz", "Bps", "binBps", "pps", "bool"}
COUNTER_FUNCS = {"rate", "irate", "increase"}
# what stands for Grafana's built-in intervals while a query is parsed (no real query uses them)
RATE_MAGIC = timedelta(seconds=7777)
BUILTIN_MAGIC = {"$__rate_interval": "7777s", "${__rate_interval}": "7777s", "$__interval": "7778s",
                 "${__interval}": "7778s", "$__range": "7779s", "${__range}": "7779s"}


def load_all(folder: Path = DASHBOARDS) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def panels(d: dict) -> Iterator[dict]:
    """Every panel that is not a row, including those folded inside collapsed rows."""
    for p in d.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def targets(d: dict) -> Iterator[tuple[dict, dict]]:
    for p in panels(d):
        for t in p.get("targets") or []:
            yield p, t


def variables(d: dict) -> dict[str, dict]:
    return {v["name"]: v for v in d.get("templating", {}).get("list", [])}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} by values[name], longest names first so $__interval does not eat
    part of $__interval_ms."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def parse(expr: str) -> pp.Expr:
    """The query's AST; Grafana's interval variables stand in as odd durations (RATE_MAGIC...)."""
    for var, dur in BUILTIN_MAGIC.items():
        expr = expr.replace(var, dur)
    return pp.parse(expr)


def _children(node: object) -> list:
    if isinstance(node, pp.AggregateExpr):
        return [c for c in (node.expr, node.param) if c is not None and not isinstance(c, (str, int, float))]
    if isinstance(node, pp.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pp.Call):
        return list(node.args)
    if isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return [node.expr]
    if isinstance(node, pp.MatrixSelector):
        return [node.vector_selector]
    return []


def walk(node: object, parents: tuple = ()) -> Iterator[tuple[object, tuple]]:
    """(node, its ancestors nearest last), depth first."""
    yield node, parents
    for c in _children(node):
        yield from walk(c, parents + (node,))


def selectors(expr: str) -> list[pp.VectorSelector]:
    return [n for n, _ in walk(parse(expr)) if isinstance(n, pp.VectorSelector)]


def matchers(sel: pp.VectorSelector) -> dict[str, tuple[str, str]]:
    """label -> (operator, value), e.g. {"job": ("=~", "$job")}."""
    # MatchOp values compare but do not hash
    ops = ((pp.MatchOp.Equal, "="), (pp.MatchOp.NotEqual, "!="), (pp.MatchOp.Re, "=~"), (pp.MatchOp.NotRe, "!~"))
    return {m.name: (next(sym for op, sym in ops if m.op == op), m.value) for m in sel.matchers.matchers}


def lint_query(expr: str) -> list[str]:
    """The linter's target rules for one PromQL query: job, instance and vgpu matchers on every
    selector, $__rate_interval in every rate(), counters only under rate/irate/increase."""
    try:
        root = parse(expr)
    except Exception as err:  # the parser raises its own error types
        return [f"invalid PromQL ({err}): {expr}"]
    out = []
    for node, parents in walk(root):
        if isinstance(node, pp.VectorSelector):
            m = matchers(node)
            for label in FILTERS:
                want = VGPU_VALUES if label == "vgpu" else {f"${label}"}
                got = m.get(label)
                if got is None or got[0] != "=~" or got[1] not in want:
                    out.append(f"selector {node.name} lacks {label}=~\"{sorted(want)[0]}\" (has {got}): {expr}")
            if node.name and node.name.endswith("_total"):
                ok = (len(parents) >= 2 and isinstance(parents[-1], pp.MatrixSelector)
                      and isinstance(parents[-2], pp.Call) and parents[-2].func.name in COUNTER_FUNCS)
                if not ok:
                    out.append(f"counter {node.name} is not under rate/irate/increase: {expr}")
        if isinstance(node, pp.Call) and node.func.name in ("rate", "irate"):
            for arg in node.args:
                if isinstance(arg, pp.MatrixSelector) and arg.range != RATE_MAGIC:
                    out.append(f"{node.func.name}() over [{pp.display_duration(arg.range)}], "
                               f"not [$__rate_interval]: {expr}")
    return out


def lint(d: dict) -> list[str]:
    """The rules of Grafana's dashboard linter this project keeps, as a list of problems."""
    title = d.get("title") or "(untitled)"
    out: list[str] = []

    def bad(msg: str) -> None:
        out.append(f"{title}: {msg}")

    if not re.fullmatch(r"gvtbench-[a-z0-9-]{1,31}", d.get("uid") or ""):
        bad(f"uid {d.get('uid')!r} is not a stable gvtbench-... uid of at most 40 characters")
    if d.get("editable", True):
        bad("is editable (provisioned dashboards are changed in code)")
    v = variables(d)
    ds = v.get("datasource")
    if ds is None or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        bad("has no `datasource` variable of type datasource and query prometheus")
    for name in FILTERS:
        var = v.get(name)
        if var is None:
            bad(f"has no `{name}` variable")
            continue
        checks = {"type": "query", "multi": True, "includeAll": True, "allValue": ".+", "refresh": 2}
        for key, want in checks.items():
            if var.get(key) != want:
                bad(f"variable {name}: {key} is {var.get(key)!r}, not {want!r}")
        if (var.get("datasource") or {}).get("uid") not in DS_REFS:
            bad(f"variable {name}: datasource is {var.get('datasource')!r}, not the `datasource` variable")
        if not str(var.get("query", "")).startswith("label_values("):
            bad(f"variable {name}: query {var.get('query')!r} is not label_values(...)")
    ids = [p.get("id") for p in d.get("panels", [])] + [c.get("id") for p in d.get("panels", [])
                                                          for c in p.get("panels", [])]
    if len(ids) != len(set(ids)) or None in ids:
        bad(f"panel ids are not unique: {ids}")
    for p in panels(d):
        name = p.get("title") or "(untitled panel)"
        if not p.get("title"):
            bad(f"panel {p.get('id')} has no title")
        if not p.get("description"):
            bad(f"panel {name!r} has no description")
        unit = ((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        if unit not in UNITS:
            bad(f"panel {name!r}: unit {unit!r} is missing or not a Grafana unit")
        if (p.get("datasource") or {}).get("uid") not in DS_REFS:
            bad(f"panel {name!r}: datasource {p.get('datasource')!r} is not the `datasource` variable")
        ts = p.get("targets") or []
        if not ts:
            bad(f"panel {name!r} has no query")
        refs = [t.get("refId") for t in ts]
        if len(set(refs)) != len(refs) or not all(refs):
            bad(f"panel {name!r}: refIds {refs} are not unique")
        for t in ts:
            if "datasource" in t and (t["datasource"] or {}).get("uid") not in DS_REFS:
                bad(f"panel {name!r} query {t.get('refId')}: datasource is not the `datasource` variable")
            out += [f"{title}: panel {name!r} query {t.get('refId')}: {m}" for m in lint_query(t.get("expr", ""))]
    return out


def grafana_values(rate_interval: str, interval: str, range_: str, **selected: list[str] | None) -> dict[str, str]:
    """Variable values as Grafana's Prometheus datasource interpolates them: a multi-value
    variable becomes one value or (a|b), regex-escaped; None means "All", i.e. the allValue `.+`."""
    out = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_}
    for name, vals in selected.items():
        if vals is None:
            out[name] = ".+"
        else:
            esc = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", x) for x in vals]
            out[name] = esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"
    return out
