"""The op syntax of scenario files: guest programs as text, one op per line.

::

    set_handler 2us     # set_handler 2us iret=no: the handler ends masked (no iret)
    timer_arm 4ms period=4ms
    for v in 1..nr_vcpus {
        psci FN64_CPU_ON target=vcpu:$v entry=@0 context=$v
    }
    loop {              # loop 4 { ... } repeats 4 times
        compute exp 30us
        wake random-other
        wfi
    }

``parse`` turns the text into a small tree (syntax, op names and units are
checked there); ``compile`` expands it for one VM (``nr_vcpus``, ``vcpu``,
``for`` variables) into ``guest`` items.  Every error carries the line.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from .. import guest as g
from .. import hostprog as hp
from ..model import mpidr_of
from ..uapi import PsciFn

from ..durations import MAX_DURATION_NS, UNITS, duration  # noqa: F401  (one parser for files and guest)


class OpError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b,
           ast.Mod: lambda a, b: a % b}


def expr(text: str, env: dict) -> int:
    """An integer expression: literals (0x.. too), names from ``env``, + - * // % and ()."""
    src = text.replace("$", "").strip()
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        raise ValueError(f"{text!r} is not an integer expression") from None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int) and \
                not isinstance(n.value, bool):
            return n.value
        if isinstance(n, ast.Name):
            if n.id not in env:
                raise ValueError(f"unknown name {n.id!r} in {text!r} (known: "
                                 f"{', '.join(sorted(env))})")
            return env[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, (ast.FloorDiv, ast.Mod)) and b == 0:
                raise ValueError(f"division by zero in {text!r}")
            return _BINOPS[type(n.op)](a, b)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError(f"{text!r}: only integers, names, + - * // % and () are allowed")
    return ev(tree)


@dataclass
class Node:
    line: int
    kind: str            # "op", "loop", "for"
    words: list
    body: list | None = None


def parse(text: str, first_line: int, host: bool = False) -> list:
    """Parse op text whose first line is ``first_line`` of its file (``host``: a host
    thread's program, ``[[host.thread]]``: host ops, no ``for`` blocks)."""
    known = _HOST_OPS if host else _OPS
    check = _compile_host_op if host else _compile_op
    root: list = []
    stack = [(root, None)]
    for i, raw in enumerate(text.split("\n")):
        line = first_line + i
        src = raw.split("#", 1)[0].strip()
        if not src:
            continue
        for words in _statements(src):
            part = " ".join(words)
            if words == ["}"]:
                if len(stack) == 1:
                    raise OpError(line, "'}' closes nothing")
                stack.pop()
                continue
            body = stack[-1][0]
            if words[-1] == "{":
                head = words[:-1]
                if head and head[0] == "loop" and len(head) <= 2:
                    node = Node(line, "loop", head[1:], [])
                elif head and head[0] == "for" and len(head) == 4 and head[2] == "in" \
                        and ".." in head[3] and not host:
                    node = Node(line, "for", head[1:], [])
                else:
                    raise OpError(line, f"{part!r}: a block is 'loop {{', 'loop COUNT {{' "
                                        + ("(host programs have no 'for')" if host else
                                           "or 'for NAME in FIRST..END {'"))
                body.append(node)
                stack.append((node.body, node))
                continue
            if words[0] not in known:
                raise OpError(line, f"unknown {'host ' if host else ''}op {words[0]!r} "
                                    f"(ops: {', '.join(sorted(known))})")
            node = Node(line, "op", words)
            # check what can be checked before the VM is known
            try:
                check(node, None)
            except _NeedsVm:
                pass
            except (ValueError, KeyError) as exc:
                raise OpError(line, f"{part}: {exc}") from None
            body.append(node)
    if len(stack) > 1:
        raise OpError(stack[-1][1].line, "this block is never closed with '}'")
    return root


def _statements(src: str) -> list:
    """Split a line into statements: ';' separates, '{' ends a block head, '}' stands alone."""
    out, cur = [], []
    for tok in re.split(r"([{};])", src):
        if tok == "{":
            out.append(cur + ["{"])
            cur = []
        elif tok in ("}", ";"):
            if cur:
                out.append(cur)
            cur = []
            if tok == "}":
                out.append(["}"])
        else:
            cur += tok.split()
    if cur:
        out.append(cur)
    return out


class _NeedsVm(Exception):
    pass


class Ctx:
    """What compiling needs: the VM (code addresses), names, and the @N seen."""

    def __init__(self, vm, env: dict):
        self.vm = vm
        self.env = env
        self.entries: list = []      # (line, op index)
        self.line = 0
        #: Work left for ``compile``: ops emitted plus ``for`` iterations.  A program
        #: has at most MAX_PROGRAM_OPS ops, so no valid file needs more.
        self.budget = self.budget_total = g.MAX_PROGRAM_OPS


def compile(nodes: list, ctx: Ctx) -> list:
    out = []
    for n in nodes:
        try:
            if n.kind == "op":
                ctx.line = n.line
                _spend(ctx, n, 1)
                out.append(_compile_op(n, ctx))
            elif n.kind == "loop":
                count = expr(n.words[0], ctx.env) if n.words else 0
                out.append(g.loop(compile(n.body, ctx), count=count))
            else:
                name, _, rng = n.words
                lo, hi = rng.split("..", 1)
                lo, hi = expr(lo, ctx.env), expr(hi, ctx.env)
                _spend(ctx, n, max(0, hi - lo))      # before the range is expanded
                saved = ctx.env.get(name)
                for v in range(lo, hi):
                    ctx.env[name] = v
                    out.extend(compile(n.body, ctx))
                if saved is None:
                    ctx.env.pop(name, None)
                else:
                    ctx.env[name] = saved
        except OpError:
            raise
        except (ValueError, KeyError) as exc:
            raise OpError(n.line, f"{' '.join(n.words) if n.kind == 'op' else n.kind}: "
                                  f"{exc}") from None
    return out


def _spend(ctx, node, work: int) -> None:
    if work > ctx.budget:
        raise OpError(node.line, f"{' '.join(node.words) if node.kind == 'op' else node.kind}"
                                 f"{' ' + ' '.join(node.words) if node.kind == 'for' else ''}: "
                                 f"the programs of a VM would exceed {ctx.budget_total} ops "
                                 f"(a for range or the ops it expands to is too large)")
    ctx.budget -= work


def _int(word, ctx):
    if ctx is None:
        if "$" in word or re.search(r"[A-Za-z_]", word.replace("0x", "").replace("0X", "")):
            raise _NeedsVm
        return expr(word, {})
    return expr(word, ctx.env)


def _value(word, ctx):
    """A register value: an integer expression, ``@N`` (code address of op N) or
    ``vcpu:N`` (that vCPU's MPIDR)."""
    if "=" in word:
        word = word.split("=", 1)[1]
    if word.startswith("@"):
        idx = _int(word[1:], ctx)
        if idx < 0:
            raise ValueError(f"{word}: op index is negative")
        if ctx is None or ctx.vm is None:
            raise _NeedsVm
        ctx.entries.append((ctx.line, idx))
        return ctx.vm.code_address(idx)
    if word.startswith("vcpu:"):
        vid = _int(word[5:], ctx)
        if ctx is None:
            raise _NeedsVm
        if not 0 <= vid < ctx.env["nr_vcpus"]:
            raise ValueError(f"{word}: the VM has vCPUs 0..{ctx.env['nr_vcpus'] - 1}")
        return mpidr_of(vid)
    return _int(word, ctx)


def _reg(word):
    if not re.fullmatch(r"x[0-3]", word):
        raise ValueError(f"{word!r} is not a register x0..x3")
    return int(word[1])


def _kw(words, name):
    """Pop ``name=VALUE`` from words."""
    for i, w in enumerate(words):
        if w.startswith(name + "="):
            del words[i]
            return w.split("=", 1)[1]
    return None


def _nargs(words, lo, hi=None):
    hi = lo if hi is None else hi
    if not lo <= len(words) - 1 <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"{words[0]} takes {want} argument(s), not {len(words) - 1}")


def _compile_op(node: Node, ctx):
    w = list(node.words)
    op = w[0]
    if op == "compute":
        if len(w) > 1 and w[1] == "exp":
            _nargs(w, 2)
            return g.compute_exp(duration(w[2]))
        if len(w) > 1 and w[1] == "uniform":
            _nargs(w, 3)
            return g.compute_uniform(duration(w[2]), duration(w[3]))
        _nargs(w, 1)
        return g.compute(duration(w[1]))
    if op in ("wfi", "hlt", "mask", "unmask", "hvc", "end", "timer_cancel"):
        _nargs(w, 0)
        return {"wfi": g.wfi, "hlt": g.wfi, "mask": g.mask, "unmask": g.unmask, "hvc": g.hvc,
                "end": g.end, "timer_cancel": g.timer_cancel}[op]()
    if op == "wake":
        _nargs(w, 1)
        if w[1] == "random-other":
            return g.wake_random_other()
        if w[1] == "next":
            return g.wake_next()
        return g.wake(_int(w[1], ctx))
    if op in ("sgi", "ipi"):
        _nargs(w, 2)
        t = w[2]
        if t in ("all-but-self", "random-other", "next"):
            return g.sgi(_int(w[1], ctx), t)
        ids = [_int(x, ctx) for x in t.split(",")]
        return g.sgi(_int(w[1], ctx), ids[0] if len(ids) == 1 and "," not in t else ids)
    if op in ("irq_enable", "irq_disable"):
        _nargs(w, 1)
        return (g.irq_enable if op == "irq_enable" else g.irq_disable)(_int(w[1], ctx))
    if op == "set_priority":
        _nargs(w, 2)
        return g.set_priority(_int(w[1], ctx), _int(w[2], ctx))
    if op in ("set_pmr", "set_tpr"):
        _nargs(w, 1)
        return g.set_pmr(_int(w[1], ctx))
    if op == "set_handler":
        iret = _kw(w, "iret")
        if iret not in (None, "yes", "no"):
            raise ValueError(f"iret={iret} must be iret=yes or iret=no")
        _nargs(w, 1)
        return g.set_handler(duration(w[1]), iret != "no")
    if op == "timer_arm":
        period = _kw(w, "period")
        period = 0 if period is None else duration(period, "period")
        if len(w) > 1 and w[1] == "exp":
            _nargs(w, 2)
            return g.timer_arm_exp(duration(w[2]), period)
        _nargs(w, 1)
        return g.timer_arm(duration(w[1]), period)
    if op == "dist_enable":
        _nargs(w, 0, 1)
        if len(w) == 2 and w[1] not in ("on", "off"):
            raise ValueError(f"dist_enable takes 'on' or 'off', not {w[1]!r}")
        return g.dist_enable(len(w) == 1 or w[1] == "on")
    if op == "route_spi":
        _nargs(w, 2)
        return g.route_spi(_int(w[1], ctx), _value(w[2], ctx))
    if op == "set_reg":
        _nargs(w, 2)
        return g.set_reg(_reg(w[1]), _value(w[2], ctx))
    if op == "sync":
        _nargs(w, 1)
        if w[1].startswith("x"):
            return g.sync_reg(_reg(w[1]))
        return g.sync(_value(w[1], ctx))
    if op == "psci":
        if len(w) < 2:
            raise ValueError("psci needs a function: psci CPU_ON|FN64_CPU_ON|CPU_OFF|... [args]")
        fn = w[1]
        if fn in PsciFn.__members__:
            fnv = int(PsciFn[fn])
        else:
            try:
                fnv = int(fn, 0)
            except ValueError:
                raise ValueError(f"unknown PSCI function {fn!r}") from None
        _nargs(w, 1, 4)
        return g.psci(fnv, *[_value(x, ctx) for x in w[2:]])
    raise KeyError(op)


_OPS = frozenset({"compute", "wfi", "hlt", "mask", "unmask", "hvc", "end", "timer_cancel",
                  "wake", "sgi", "ipi", "irq_enable", "irq_disable", "set_priority", "set_pmr",
                  "set_tpr", "set_handler", "timer_arm", "dist_enable", "route_spi", "set_reg",
                  "sync", "psci"})


# -- host programs ([[host.thread]]) -----------------------------------------------------------

_HOST_OPS = frozenset({"compute", "sleep", "sleep_until", "msi", "irq", "end"})


def _host_dist(w):
    """A duration spec after compute / sleep: D, exp D, uniform LO HI."""
    if len(w) > 1 and w[1] == "exp":
        _nargs(w, 2)
        return ("exp", duration(w[2]))
    if len(w) > 1 and w[1] == "uniform":
        _nargs(w, 3)
        return ("uniform", duration(w[2]), duration(w[3]))
    _nargs(w, 1)
    return duration(w[1])


def _compile_host_op(node: Node, ctx):
    """A host op (``kvmwake.hostprog``): ``compute`` / ``sleep`` with a duration as
    guest ``compute`` takes it, ``msi APIC_ID VECTOR [vm=N]`` (x86), ``irq INTID
    [vm=N]`` (arm64), ``end``.  ``vm=N``: the host's N-th VM (default 0)."""
    w = list(node.words)
    op = w[0]
    if op == "compute":
        return hp.compute(_host_dist(w))
    if op == "sleep":
        return hp.sleep(_host_dist(w))
    if op == "sleep_until":
        return hp.sleep_until(_host_dist(w))
    if op == "end":
        _nargs(w, 0)
        return hp.end()
    vm = _kw(w, "vm")
    vmi = 0 if vm is None else _int(vm, ctx)
    if op == "msi":
        _nargs(w, 2)
        return hp.msi(vmi, _int(w[1], ctx), _int(w[2], ctx))
    _nargs(w, 1)
    return hp.irq(vmi, _int(w[1], ctx))


def compile_host(nodes: list, ctx) -> list:
    """Host-program nodes -> ``kvmwake.hostprog`` items (``loop {`` repeats forever)."""
    out = []
    for n in nodes:
        try:
            if n.kind == "op":
                ctx.line = n.line
                _spend(ctx, n, 1)
                out.append(_compile_host_op(n, ctx))
            else:
                count = expr(n.words[0], ctx.env) if n.words else None
                out.append(hp.loop(compile_host(n.body, ctx), count=count))
        except OpError:
            raise
        except (ValueError, KeyError) as exc:
            raise OpError(n.line, f"{' '.join(n.words) if n.kind == 'op' else n.kind}: "
                                  f"{exc}") from None
    return out
