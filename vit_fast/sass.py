"""Reading a compiled Triton kernel's SASS: its loops, what each iteration issues, and which
``for`` statement of the kernel's Python source each loop is.

``nvdisasm -c -gi`` (the disassembler shipped in the triton wheel) prints every instruction with
its address and, before each run of instructions from one source line, that line's chain of
inlined calls (innermost first: ``File "a.py", line 143 inlined at "a.py", line 363``, then
``File "a.py", line 363 inlined at ...``, ..., then the kernel's own line). ``parse_sass`` reads
that into ``Instruction``s; ``find_loops`` finds the loops (a branch to a lower address closes
one: the body is the target through the branch, and a loop inside another's body is nested in
it); ``profile`` counts, per loop and outside every loop, the instructions and among them the
tensor-core, barrier, global-load, shuffle, conversion and integer-division ones; and
``loop_label`` names a loop by the kernel source it came from (``_weight_grad_tile#2/for
m_start``: the calls from the kernel down to the ``for`` statement, each callee numbered when its
caller calls it more than once), which is how ``vit_fast.gpu_work`` declares trip counts.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from dataclasses import dataclass, field

# Part of the profile cache's key (vit_fast.gpu_time): bump it when what a profile holds changes.
PROFILE_VERSION = 2

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE_INFO = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # mnemonic with modifiers, e.g. "HMMA.16816.F32.BF16", without its predicate
    text: str  # the whole instruction, predicate and operands included
    target: int | None  # a branch's target address
    chain: tuple  # ((file, line), ...) innermost first: the source line and the calls it is inlined through

    @property
    def mnemonic(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``nvdisasm -c -gi`` output (one kernel), branch targets resolved."""
    rows, labels, pending_labels = [], {}, []
    chain: list = []
    in_info = False
    for line in text.splitlines():
        info = _LINE_INFO.match(line)
        if info:
            if not in_info:
                chain = []
            chain.append((info.group(1), int(info.group(2))))
            in_info = True
            continue
        label = _LABEL.match(line.strip())
        if label:
            pending_labels.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        in_info = False
        address, body = int(match.group(1), 16), match.group(2)
        for name in pending_labels:
            labels[name] = address
        pending_labels = []
        words = body.split()
        opcode = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        target = _TARGET.search(body)
        rows.append((address, opcode, body, target.group(1) if target else None, tuple(chain)))
    return [Instruction(a, op, body, labels.get(t) if t else None, c) for a, op, body, t, c in rows]


@dataclass
class Loop:
    start: int  # address of the loop's first instruction (a backward branch's target)
    end: int  # address of its last backward branch
    children: list[Loop] = field(default_factory=list)
    parent: Loop | None = field(default=None, repr=False)

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop, outermost first: a branch to a lower address closes a loop from that target to
    the branch; branches back to one target are one loop (its last one closes it); a loop whose
    span lies inside another's is nested in it. A branch to itself is no source loop: the trap
    after a kernel's or subroutine's end, or a wait that spins on a hardware barrier."""
    ends: dict[int, int] = {}
    for ins in instructions:
        if ins.mnemonic == "BRA" and ins.target is not None and ins.target < ins.address:
            ends[ins.target] = max(ends.get(ins.target, ins.target), ins.address)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda loop: (loop.start, -loop.end))
    for i, loop in enumerate(loops):
        outers = [o for o in loops[:i] if o.start <= loop.start and loop.end <= o.end and o is not loop]
        if outers:
            loop.parent = min(outers, key=lambda o: o.end - o.start)
            loop.parent.children.append(loop)
    return loops


# ----------------------------------------------------------------------------- instruction classes


def category(ins: Instruction) -> str | None:
    """The class of an instruction the estimate counts apart, or None."""
    op, m = ins.opcode, ins.mnemonic
    if m in ("HMMA", "HGMMA", "IMMA", "DMMA"):
        return "mma"
    if m == "BAR":
        return "barrier"
    if m in ("LDG", "LDGSTS") or op.startswith("UTMALDG"):
        return "global_load"
    if m in ("STG", "UTMASTG"):
        return "global_store"
    if m in ("LDS", "LDSM", "STS"):
        return "shared"
    if m == "SHFL":
        return "shuffle"
    if m in ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"):
        return "conversion"
    if m == "MUFU":
        return "special"
    return None


def is_division_step(ins: Instruction) -> bool:
    """The signature instruction of an inlined integer division (or modulo) by a value known only
    at run time: ``I2F.U32.RP`` (the divisor to float, rounded up, for its reciprocal estimate)
    starts each; the rest of the ~20-instruction sequence (MUFU.RCP, F2I, IMAD.HI, the fix-ups) is
    counted with it by ``DIVISION_INSTRUCTIONS``."""
    return ins.opcode.startswith("I2F") and ".RP" in ins.opcode


# Instructions of one inlined 32-bit integer division or modulo by a run-time divisor, as ptxas
# emits it (I2F.U32.RP, MUFU.RCP, VIADD, F2I.FTZ.U32.TRUNC, IMAD.MOV, IMAD, IMAD.HI.U32, IMAD.HI.U32,
# IMAD, ISETP, @P IADD, @P IADD, ISETP, @P IADD, @!P LOP3 and sign fix-ups; counted in our kernels'
# SASS): about 16-20. Used only to say how much of an iteration divisions take.
DIVISION_INSTRUCTIONS = 18


_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")  # HGMMA.64x128x16: one warpgroup's wgmma


def mma_flops(ins: Instruction) -> int:
    """FLOPs one warp's tensor core does for this mma instruction: 2 m n k of an mma.sync
    (``HMMA.16816``: 4096), a quarter of a warpgroup's ``HGMMA.<m>x<n>x<k>`` (its four warps share
    it); 0 for other instructions or shapes not read."""
    if ins.mnemonic == "HGMMA":
        m = _HGMMA_SHAPE.match(ins.opcode)
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4 if m else 0
    if ins.mnemonic == "HMMA":
        digits = ins.opcode.split(".")[1] if "." in ins.opcode else ""
        shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
        if digits in shapes:
            m, n, k = shapes[digits]
            return 2 * m * n * k
    return 0


def counts(instructions: list[Instruction]) -> dict[str, int]:
    c = {"instructions": len(instructions), "mma": 0, "mma_flops": 0, "barrier": 0, "global_load": 0,
         "global_store": 0, "shared": 0, "shuffle": 0, "conversion": 0, "special": 0, "divisions": 0, "ldgsts": 0}
    for ins in instructions:
        kind = category(ins)
        if kind:
            c[kind] += 1
        c["mma_flops"] += mma_flops(ins)
        c["divisions"] += is_division_step(ins)
        c["ldgsts"] += ins.mnemonic == "LDGSTS" or ins.opcode.startswith("UTMALDG")
    return c


# ----------------------------------------------------------------------------- source labels


@functools.lru_cache(maxsize=None)
def _source_tree(path: str):
    with open(path) as f:
        return ast.parse(f.read())


def _functions(path: str) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(_source_tree(path)) if isinstance(n, ast.FunctionDef)]


def _enclosing_function(path: str, line: int) -> ast.FunctionDef | None:
    best = None
    for fn in _functions(path):
        if fn.lineno <= line <= fn.end_lineno and (best is None or fn.lineno > best.lineno):
            best = fn
    return best


def _for_label(fn: ast.FunctionDef, node: ast.For) -> str:
    """``for <target>`` with ``#k`` when the function has more than one ``for`` of that target."""
    target = ast.unparse(node.target)
    same = [n for n in ast.walk(fn) if isinstance(n, ast.For) and ast.unparse(n.target) == target]
    same.sort(key=lambda n: n.lineno)
    return f"for {target}" + (f"#{same.index(node) + 1}" if len(same) > 1 else "")


def _callee_name(call: ast.Call) -> str:
    return ast.unparse(call.func).split(".")[-1]


def _call_label(fn: ast.FunctionDef, call: ast.Call) -> str:
    """The callee's name, with ``#k`` when ``fn`` calls it more than once (k-th call in the source)."""
    name = _callee_name(call)
    same = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call) and _callee_name(n) == name),
                  key=lambda n: (n.lineno, n.col_offset))
    return name + (f"#{same.index(call) + 1}" if len(same) > 1 else "")


def _calls_on_line(fn: ast.FunctionDef, line: int) -> list[ast.Call]:
    """Calls of functions defined in our kernel sources that span ``line`` (multi-line calls too)."""
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and n.lineno <= line <= n.end_lineno]


class SourceIndex:
    """Our kernels' sources (the files of one package directory), looked up by a line-info file
    name: the cubin may name another checkout's path (Triton's cache is keyed by source, so the
    lines agree), so a file is found by its name relative to the package directory's parent."""

    def __init__(self, package_dir: str) -> None:
        self.package_dir = os.path.abspath(package_dir)
        self.package = os.path.basename(self.package_dir)
        self.functions = {fn.name: (path, fn) for path in self._files() for fn in _functions(path)}

    def _files(self) -> list[str]:
        return [os.path.join(self.package_dir, f) for f in sorted(os.listdir(self.package_dir)) if f.endswith(".py")]

    def local(self, path: str) -> str | None:
        parts = path.replace("\\", "/").split("/")
        if len(parts) >= 2 and parts[-2] == self.package:
            candidate = os.path.join(self.package_dir, parts[-1])
            return candidate if os.path.exists(candidate) else None
        return None

    def loop_label(self, chain: tuple) -> str | None:
        """The label of the loop whose back-edge has this line-info chain, or None when the chain
        reaches no ``for`` statement of our sources. Frames outside our package (Triton's
        standard library) are skipped; each of our frames but the innermost is a call, labelled
        by its callee; the innermost is the ``for`` line, or a call whose callee (transitively)
        holds exactly one ``for`` (line info may stop at the call site of an inlined loop)."""
        frames = [(self.local(path), line) for path, line in reversed(chain)]  # outermost first
        frames = [(path, line) for path, line in frames if path]
        if not frames:
            return None
        parts = []
        for depth, (path, line) in enumerate(frames):
            fn = _enclosing_function(path, line)
            if fn is None:
                return None
            innermost = depth == len(frames) - 1
            loops = [n for n in ast.walk(fn) if isinstance(n, ast.For) and n.lineno == line]
            if innermost and loops:
                parts.append(_for_label(fn, loops[0]))
                return "/".join(parts)
            calls = [c for c in _calls_on_line(fn, line) if _callee_name(c) in self.functions]
            if not calls:
                return None if not innermost else self._loop_in_enclosing_for(fn, line, parts)
            call = min(calls, key=lambda c: c.end_lineno - c.lineno)  # the innermost call spanning the line
            parts.append(_call_label(fn, call))
            if innermost:
                return self._descend(_callee_name(call), parts)
        return None

    def _loop_in_enclosing_for(self, fn: ast.FunctionDef, line: int, parts: list[str]) -> str | None:
        """A back-edge attributed to a line inside a ``for`` body: that ``for`` (the innermost)."""
        loops = [n for n in ast.walk(fn) if isinstance(n, ast.For) and n.lineno <= line <= n.end_lineno]
        if not loops:
            return None
        return "/".join([*parts, _for_label(fn, max(loops, key=lambda n: n.lineno))])

    def _descend(self, name: str, parts: list[str]) -> str | None:
        """Down from a call whose inlined loop lost its line info: the callee's single ``for``, or
        through its single call of a function that holds loops."""
        path, fn = self.functions[name]
        loops = [n for n in ast.walk(fn) if isinstance(n, ast.For)]
        inner_calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call) and _callee_name(c) in self.functions
                       and self._has_loop(_callee_name(c))]
        if len(loops) == 1 and not inner_calls and not _is_static(loops[0]):
            return "/".join([*parts, _for_label(fn, loops[0])])
        if not loops and len(inner_calls) == 1:
            return self._descend(_callee_name(inner_calls[0]), [*parts, _call_label(fn, inner_calls[0])])
        return None

    def _has_loop(self, name: str, seen: frozenset = frozenset()) -> bool:
        if name in seen:
            return False
        _, fn = self.functions[name]
        if any(isinstance(n, ast.For) and not _is_static(n) for n in ast.walk(fn)):
            return True
        return any(self._has_loop(_callee_name(c), seen | {name}) for c in ast.walk(fn)
                   if isinstance(c, ast.Call) and _callee_name(c) in self.functions)


def _is_static(node: ast.For) -> bool:
    """``tl.static_range`` loops are unrolled at compile time: no SASS loop."""
    return isinstance(node.iter, ast.Call) and _callee_name(node.iter) == "static_range"


# ----------------------------------------------------------------------------- the profile


@dataclass
class LoopProfile:
    label: str | None  # the loop's source label (SourceIndex.loop_label), None when unresolved
    start: int
    end: int
    depth: int  # 0: outermost
    parent: int | None  # index of the enclosing loop in the profile's list
    own: dict  # counts of the body's instructions outside nested loops (per SASS iteration)
    pipelined: bool  # global loads issued asynchronously (LDGSTS/TMA) ahead of their use
    # ptxas may unroll a loop: a main loop doing ``unroll`` source iterations per pass and a
    # remainder loop after it (same label and parent) doing one. The main loop's counts / unroll
    # are then the cost of one source iteration; the remainder (``remainder`` True, fewer than
    # ``unroll`` iterations per program) is not costed apart.
    unroll: int = 1
    remainder: bool = False

    def per_iteration(self, name: str = "instructions") -> float:
        """Count ``name`` per source iteration (an unrolled main loop's count / unroll)."""
        return self.own.get(name, 0) / self.unroll


@dataclass
class SassProfile:
    kernel: str
    capability: int
    loops: list[LoopProfile]
    straight: dict  # counts of the instructions outside every loop (all branches together)
    total_instructions: int

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "capability": self.capability, "straight": self.straight,
                "total_instructions": self.total_instructions, "loops": [vars(lp) for lp in self.loops]}

    @classmethod
    def from_dict(cls, d: dict) -> SassProfile:
        return cls(d["kernel"], d["capability"], [LoopProfile(**lp) for lp in d["loops"]], d["straight"],
                   d["total_instructions"])


def profile(text: str, kernel: str, capability: int, sources: SourceIndex | None) -> SassProfile:
    """The loops and counts of one kernel's ``nvdisasm -c -gi`` output."""
    instructions = parse_sass(text)
    loops = find_loops(instructions)
    index = {id(loop): i for i, loop in enumerate(loops)}
    by_address = {ins.address: ins for ins in instructions}
    result = []
    for loop in loops:
        body = [ins for ins in instructions if loop.contains(ins.address)
                and not any(child.contains(ins.address) for child in loop.children)]
        depth, outer = 0, loop.parent
        while outer is not None:
            depth, outer = depth + 1, outer.parent
        back_edge = by_address[loop.end]
        label = sources.loop_label(back_edge.chain) if sources else None
        own = counts(body)
        result.append(LoopProfile(label, loop.start, loop.end, depth,
                                  index[id(loop.parent)] if loop.parent else None, own, own["ldgsts"] > 0))
    bodies = {i: [ins for ins in instructions if loop.contains(ins.address)
                  and not any(child.contains(ins.address) for child in loop.children)] for i, loop in enumerate(loops)}
    _mark_unrolled(result, bodies)
    outside = [ins for ins in instructions if not any(loop.contains(ins.address) for loop in loops)]
    return SassProfile(kernel, capability, result, counts(outside), len(instructions))


# Loop control and address arithmetic, which an unrolled loop does not repeat per source iteration.
_CONTROL = {"BRA", "ISETP", "IADD3", "IADD", "VIADD", "IMAD", "NOP", "BSSY", "BSYNC", "MOV", "UIADD3", "ULDC",
            "LDC", "LEA", "UMOV", "SHF", "LOP3", "SEL", "PLOP3", "ISETP"}


def unroll_factor(main: list[Instruction], remainder: list[Instruction]) -> int:
    """Source iterations per pass of an unrolled loop: the ratio of the remainder's most repeated
    work instruction (not loop control) in the main loop to its count in the remainder."""
    def histogram(body):
        h: dict[str, int] = {}
        for ins in body:
            if ins.mnemonic not in _CONTROL:
                h[ins.opcode] = h.get(ins.opcode, 0) + 1
        return h

    m, r = histogram(main), histogram(remainder)
    shared = [op for op in r if op in m]
    if not shared:
        return 1
    op = max(shared, key=lambda o: (r[o], o))
    return max(1, round(m[op] / r[op]))


def _mark_unrolled(result: list[LoopProfile], bodies: dict) -> None:
    groups: dict[tuple, list[int]] = {}
    for i, lp in enumerate(result):
        if lp.label is not None:
            groups.setdefault((lp.label, lp.parent), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        main = max(members, key=lambda i: result[i].own["instructions"])
        rest = [i for i in members if i != main]
        result[main].unroll = unroll_factor(bodies[main], bodies[min(rest, key=lambda i: result[i].own["instructions"])])
        for i in rest:
            result[i].remainder = True
