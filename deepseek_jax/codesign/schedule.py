"""What XLA's latency-hiding scheduler did to the collectives of a compiled GPU program.

Reads the text of ``compiled.as_text()`` (scheduled HLO: each computation's instruction
order is the execution order on the compute stream) and finds every collective:
- an overlapped collective is a ``*-start`` ... compute ... ``*-done`` window (also
  ``async-start``/``async-done`` wrappers and Triton collective fusions, ``fusion-start``
  of kind ``__triton_collective``);
- a collective with nothing to overlap is a plain op (``"is_sync":true``): counted sync.

Cost model (``CostModel``, printed with every result): transfer time = bytes over the
slowest link of the collective's mesh axes (for an all-to-all over P peers, the (P - 1) / P
of its buffer that leaves the device) (``node`` and ``stage`` 50 GB/s per GPU, 400 Gb/s IB;
``gpu`` 160 GB/s, H800 NVLink as measured in V3TR 3.2.2); compute time of a window = its
dots' FLOPs at 989 TFLOP/s (H100 BF16 dense) plus the other kernels' bytes (operands and
result; of a dynamic-update-slice only its update: XLA writes it in place) at 3.35 TB/s;
hidden = min(1, window compute / transfer). A sync collective hides 0. Collectives in a
loop body count once per trip. What it ignores: latency, contention
between collectives in flight together (each window's compute is credited to every
collective open across it), and whether the GPU really runs the two streams concurrently:
it reads XLA's intended schedule, not a measured one.
"""

from __future__ import annotations

import dataclasses
import math
import re

from deepseek_jax.mesh import GPU, NODE, STAGE

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2}
_BYTES |= {"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_BYTES |= {"c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*)$")
COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
_FREE = {"parameter", "constant", "get-tuple-element", "bitcast", "tuple", "partition-id"}
_FREE |= {"replica-id", "after-all", "opt-barrier", "add-dependency"}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Link bandwidths per GPU (bytes/s) by mesh axis, and the compute roofline."""

    link_Bps: tuple[tuple[str, float], ...] = ((NODE, 50e9), (GPU, 160e9), (STAGE, 50e9))
    flops: float = 989e12
    hbm_Bps: float = 3.35e12

    def transfer_s(self, nbytes: float, axes: tuple[str, ...]) -> float:
        links = dict(self.link_Bps)
        bw = min((links[a] for a in axes if a in links), default=max(links.values()))
        return nbytes / bw

    def exchange_s(self, topo, caps, row_bytes: float, flat: bool) -> list[float]:
        """Wire seconds of one expert-parallel exchange's all-to-alls, in dispatch order
        (flat: one over both axes; two-hop: node, then gpu): the rows of each peer's buffer
        that leave the device. ``topo``, ``caps``: ``moe.dispatch.Topology``, ``Capacities``."""

        def hop(peers: int, rows: int, axes: tuple[str, ...]) -> float:
            return self.transfer_s(peers * rows * row_bytes * (peers - 1) / peers, axes)

        if flat:
            axes = (topo.inter, topo.intra) if topo.nodes > 1 else (topo.intra,)
            return [hop(topo.devices, caps.flat, axes)]
        return [hop(topo.nodes, caps.node, (topo.inter,)), hop(topo.gpus, caps.gpu, (topo.intra,))]

    def describe(self) -> str:
        links = ", ".join(f"{a} {b / 1e9:g} GB/s" for a, b in self.link_Bps)
        return (
            "cost model: transfer = bytes leaving (all-to-all: (P-1)/P) / slowest link of the "
            f"axes ({links}); window compute = dot FLOPs / {self.flops / 1e12:g} TFLOP/s + "
            "other kernels' bytes / "
            f"{self.hbm_Bps / 1e12:g} TB/s; hidden = min(1, compute / transfer); sync = 0; "
            "loops count once per trip"
        )


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the text inside the opcode's parentheses (a constant's literal)

    def calls(self) -> list[str]:
        found = re.findall(
            r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", self.attrs
        )
        branches = re.search(r"branch_computations=\{([^}]*)\}", self.attrs)
        return found + (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else [])

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Collective:
    """One collective of the schedule; times in seconds, per execution of its computation."""

    name: str
    kind: str
    axes: tuple[str, ...]
    nbytes: int
    is_async: bool  # a start/done pair (possibly with nothing between)
    window: list[str]  # compute ops between start and done
    compute_s: float
    transfer_s: float
    trips: int  # executions per program run (loop trips)
    op_name: str

    @property
    def overlapped(self) -> bool:
        return self.is_async and self.compute_s > 0

    @property
    def hidden(self) -> float:
        if not self.overlapped or self.transfer_s <= 0:
            return 0.0 if self.transfer_s > 0 else float(self.overlapped)
        return min(1.0, self.compute_s / self.transfer_s)

    @property
    def phase(self) -> str:
        return "backward" if "transpose(" in self.op_name else "forward"


# ------------------------------------------------------------------------ parsing


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (tuples summed; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    return int(total)


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"HLO: unbalanced parentheses in {text[:120]!r}")


def _instr(name: str, rest: str) -> Instr:
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, _ = rest.partition("(")
    end = _balanced(rest, len(opcode)) if paren else len(rest)
    operands = re.findall(r"%([\w.\-]+)", rest[len(opcode) : end])
    return Instr(name, shape, opcode, operands, rest[end:], rest[len(opcode) + 1 : end - 1])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations (name -> instructions in schedule order) and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "->" in line:
                current = comps.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            current.append(_instr(m.group(1), m.group(2)))
    if not entry:
        raise ValueError("HLO: no ENTRY computation found (is this compiled.as_text()?)")
    return comps, entry


def mesh_axes(attrs: str, axis_sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes a collective spans, from its ``replica_groups`` (or ``source_target_pairs``).

    Reads the mesh form (``mesh['node'=2,'gpu'=8] {'node'}``); explicit and iota group lists
    are decoded assuming device ids in mesh order (row-major over ``axis_sizes``).
    """
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        axes = tuple(re.findall(r"'(\w+)'", m.group(2)))
        if all(a in axis_sizes for a in axes):
            return axes
        # XLA's own flattened mesh (e.g. ['axis_0'=16]): all devices, or axes we cannot name
        span = math.prod(sizes.get(a, 1) for a in axes)
        return tuple(axis_sizes) if span == math.prod(axis_sizes.values()) else axes
    groups = _groups(attrs)
    if groups is None:
        return tuple(axis_sizes)  # no groups: every device
    names, sizes = list(axis_sizes), list(axis_sizes.values())

    def coords(d):
        out = []
        for s in reversed(sizes):
            out.append(d % s)
            d //= s
        return out[::-1]

    varying = set()
    for g in groups:
        cs = [coords(d) for d in g]
        varying |= {names[i] for i in range(len(names)) if len({c[i] for c in cs}) > 1}
    return tuple(a for a in names if a in varying)


def _groups(attrs: str) -> list[list[int]] | None:
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        import numpy as np

        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[0-9,{} ]*\})\}", attrs)
    if m:
        return [
            [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))
        ]
    return None


class Schedule:
    """The collectives of one scheduled HLO module, with their windows priced by ``model``."""

    def __init__(self, text: str, axis_sizes: dict[str, int], model: CostModel = CostModel()):
        self.comps, self.entry = parse_module(text)
        self.shapes = {c: {i.name: i.shape for i in ins} for c, ins in self.comps.items()}
        self.axis_sizes, self.model = axis_sizes, model
        self._cost_cache: dict[str, float] = {}
        self.collectives: list[Collective] = []
        self._walk(self.entry, 1, set())

    # -------------------------------------------------------------- traversal
    def _walk(self, comp: str, trips: int, seen: set[str]) -> None:
        if comp in seen or comp not in self.comps:
            return
        seen = seen | {comp}
        instrs = self.comps[comp]
        done_at = {i.operands[0]: k for k, i in enumerate(instrs) if i.opcode.endswith("-done")}
        for k, ins in enumerate(instrs):
            kind = self._kind(ins)
            if kind and ins.opcode in COLLECTIVES:
                self._add(comp, ins, kind, ins.shape, [], trips, is_async=False)
            elif kind and ins.name in done_at:
                window = instrs[k + 1 : done_at[ins.name]]
                self._add(comp, ins, kind, instrs[done_at[ins.name]].shape, window, trips, True)
            elif ins.opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
                self._walk(body, trips * self.trip_count(ins), seen)
            elif ins.opcode in ("call", "conditional"):
                for c in ins.calls():
                    self._walk(c, trips, seen)

    def _kind(self, ins: Instr) -> str | None:
        """The collective an instruction is or starts, else None."""
        op = ins.opcode
        if op in COLLECTIVES:
            return op
        if op.endswith("-start") and op[: -len("-start")] in COLLECTIVES:
            return op[: -len("-start")]
        if op in ("async-start", "fusion-start"):
            if op == "fusion-start" and "__triton_collective" not in ins.attrs:
                return None
            inner = [i.opcode for c in ins.calls() for i in self.comps.get(c, [])]
            found = [k for k in COLLECTIVES if k in inner or f"{k}-start" in inner]
            return found[0] if found else ("all-reduce" if op == "fusion-start" else None)
        return None

    def _add(self, comp, ins, kind, shape, window, trips, is_async):
        nbytes = shape_bytes(shape)
        axes = mesh_axes(ins.attrs, self.axis_sizes)
        ops = [i for i in window if self.cost(comp, i) > 0]
        self.collectives.append(
            Collective(
                name=ins.name,
                kind=kind,
                axes=axes,
                nbytes=nbytes,
                is_async=is_async and '"is_sync":true' not in ins.attrs,
                window=[i.name for i in ops],
                compute_s=sum(self.cost(comp, i) for i in ops),
                transfer_s=self.model.transfer_s(nbytes * self._leaving(kind, axes), axes),
                trips=trips,
                op_name=ins.op_name,
            )
        )

    def _leaving(self, kind: str, axes: tuple[str, ...]) -> float:
        """Share of an all-to-all's buffer that leaves the device: (P - 1) / P of P peers."""
        if kind != "all-to-all":
            return 1.0
        peers = math.prod(self.axis_sizes.get(a, 1) for a in axes)
        return (peers - 1) / peers if peers > 1 else 0.0

    def trip_count(self, ins: Instr) -> int:
        """A while loop's trips: XLA's ``known_trip_count``, else the bound its condition
        compares with (1 if neither is found)."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
        if m:
            return int(m.group(1))
        cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
        consts = [
            int(i.args)
            for i in self.comps.get(cond.group(1) if cond else "", [])
            if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args.strip())
        ]
        return max(consts) if consts else 1

    # -------------------------------------------------------------- pricing
    def program_compute_s(self) -> float:
        """Compute-stream seconds of one run of the whole program under the model."""
        return self._comp_cost(self.entry)

    def cost(self, comp: str, ins: Instr) -> float:
        """Seconds of compute-stream work of one instruction under the cost model."""
        op = ins.opcode
        if op in _FREE or op.endswith(("-start", "-done")) or op in COLLECTIVES:
            return 0.0
        if op == "while":
            body = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
            return self.trip_count(ins) * self._comp_cost(body)
        if op == "call":
            return sum(self._comp_cost(c) for c in ins.calls())
        if op == "conditional":
            return max((self._comp_cost(c) for c in ins.calls()), default=0.0)
        flops = self._flops(comp, ins)
        if flops:
            return flops / self.model.flops
        shapes = self.shapes[comp]
        update = self._in_place_update(comp, ins)  # then operand 0 is neither read nor written
        read = ins.operands if update is None else ins.operands[1:]
        written = shape_bytes(ins.shape) if update is None else update
        return (written + sum(shape_bytes(shapes.get(o, "")) for o in read)) / self.model.hbm_Bps

    def _in_place_update(self, comp: str, ins: Instr) -> int | None:
        """Bytes a dynamic-update-slice (alone or a fusion's root) writes: its update, not
        the buffer, which XLA updates in place (a scan's [L, ...] residual stacks)."""
        root, where = ins, comp
        if ins.opcode == "fusion" and ins.calls():
            where = ins.calls()[0]
            root = (self.comps.get(where) or [ins])[-1]
        if root.opcode != "dynamic-update-slice":
            return None
        return shape_bytes(self.shapes[where].get(root.operands[1], ""))

    def _comp_cost(self, comp: str) -> float:
        if comp not in self._cost_cache:
            self._cost_cache[comp] = sum(self.cost(comp, i) for i in self.comps.get(comp, []))
        return self._cost_cache[comp]

    def _flops(self, comp: str, ins: Instr) -> float:
        """2 x output x contracted size of the dots an instruction runs (fused ones too)."""
        if ins.opcode == "dot":
            lhs = _dims(self.shapes[comp].get(ins.operands[0], ""))
            m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
            k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
            return 2.0 * math.prod(_dims(ins.shape)) * k
        if ins.opcode == "custom-call" and "__cublas" in ins.attrs:
            lhs = _dims(self.shapes[comp].get(ins.operands[0], ""))
            m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
            idx = [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []
            return 2.0 * math.prod(_dims(ins.shape)) * math.prod(lhs[d] for d in idx)
        if ins.opcode == "fusion":
            return sum(self._flops(c, i) for c in ins.calls() for i in self.comps.get(c, []))
        return 0.0
