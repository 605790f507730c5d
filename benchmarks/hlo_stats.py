"""Kernel counts of a compiled XLA program, from `jax.jit(f).lower(...).compile().as_text()`.

What runs per call: walk from ENTRY; every `fusion`, `custom-call` (cuBLAS, Triton/Pallas,
cuDNN...) and every other instruction that does work (an unfused `copy`, `sort`, ...) is one
kernel launch; `while` bodies count once per iteration (XLA writes the trip count of a scan
into the while's backend_config as `known_trip_count`), `call` / `conditional` computations
are entered (XLA:GPU outlines CUDA-graph command buffers as `call`s). Fusion bodies are not
entered: a fusion is one kernel.
"""

from __future__ import annotations

import re
from collections import Counter

# Instructions that launch nothing (layout, bookkeeping, control flow entered separately).
FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "add-dependency",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "domain",
}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w.\-%])([a-z][a-z0-9\-]*)\(")


def parse(text: str) -> tuple[dict[str, list[tuple[str, str]]], str | None]:
    """computation name -> [(opcode, rest of line)], and the ENTRY computation's name."""
    comps: dict[str, list[tuple[str, str]]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            elif line.startswith("}"):
                current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        rhs = m.group(2)
        op = _OPCODE.search(rhs)
        if op:
            comps[current].append((op.group(1), rhs))
    return comps, entry


def _ref(rhs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^,}\s][^}]*?)\}?(?:,\s*[a-z_]+=|$)", rhs)
    if not m:
        m = re.search(key + r"=%?([\w.\-]+)", rhs)
        return [m.group(1)] if m else []
    return [x.strip().lstrip("%") for x in m.group(1).split(",") if x.strip()]


def kernel_stats(text: str) -> dict:
    """Launch counts per program run, with while trip counts applied, plus static totals."""
    comps, entry = parse(text)
    static = Counter(op for instrs in comps.values() for op, _ in instrs)
    dyn: Counter = Counter()
    targets: Counter = Counter()
    unknown_trips = 0
    max_trips: dict[str, int] = {}

    def walk(name: str, mult: int, depth: int = 0):
        nonlocal unknown_trips
        if name not in comps or depth > 50:
            return
        for op, rhs in comps[name]:
            if op == "while":
                m = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', rhs)
                trips = int(m.group(1)) if m else 1
                if not m:
                    unknown_trips += 1
                body = _ref(rhs, "body")
                cond = _ref(rhs, "condition")
                for b in body:
                    max_trips[b] = trips
                    walk(b, mult * trips, depth + 1)
                for c in cond:
                    walk(c, mult * (trips + 1), depth + 1)
                dyn["while"] += mult
            elif op == "call":
                for c in _ref(rhs, "to_apply"):
                    walk(c, mult, depth + 1)
            elif op == "conditional":
                branches = _ref(rhs, "branch_computations") or (
                    _ref(rhs, "true_computation") + _ref(rhs, "false_computation")
                )
                # one branch runs: count the largest
                best: Counter = Counter()
                for br in branches:
                    sub = _sub_counts(br)
                    if sum(sub.values()) > sum(best.values()):
                        best = sub
                for k, v in best.items():
                    dyn[k] += v * mult
            elif op not in FREE:
                dyn[op] += mult
                if op == "custom-call":
                    t = re.search(r'custom_call_target="([^"]+)"', rhs)
                    targets[t.group(1) if t else "?"] += mult

    def _sub_counts(name: str) -> Counter:
        c: Counter = Counter()
        for op, _ in comps.get(name, []):
            if op not in FREE:
                c[op] += 1
        return c

    if entry is not None:
        walk(entry, 1)
    launches = sum(v for k, v in dyn.items() if k != "while")
    return {
        "launches_per_call": launches,
        "fusion_per_call": dyn.get("fusion", 0),
        "custom_call_per_call": dyn.get("custom-call", 0),
        "other_ops_per_call": {
            k: v for k, v in dyn.items() if k not in ("fusion", "custom-call", "while")
        },
        "custom_call_targets_per_call": dict(targets),
        "while_loops_entered": dyn.get("while", 0),
        "static_fusion": static.get("fusion", 0),
        "static_custom_call": static.get("custom-call", 0),
        "static_while": static.get("while", 0),
        "computations": len(comps),
        "unknown_trip_counts": unknown_trips,
        "hlo_chars": len(text),
    }
