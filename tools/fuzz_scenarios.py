"""A scenario-file fuzzer: mutate the built-in TOML files and check each case either
loads (and then builds) or fails with ``ScenarioError`` reading ``FILE:LINE: KEY: ...``.

    python tools/fuzz_scenarios.py --cases 20000 --workers 2 [--seed 0] [--save-failures DIR]

Mutations are structure-aware (the file is parsed with ``tomllib`` and the
mutations work on its ``key = value`` lines and table headers): change a
value (boundary integers, durations with and without units, huge ranges,
wrong types), delete or duplicate a line, insert quoted keys holding ``=``,
``]``, ``.`` or quotes, rename a key to a quoted form, insert table headers,
plant huge ``for`` ranges and loop counts in the ops, and rarely flip or cut
bytes.  Each case runs in a worker process under an address-space limit
(``RLIMIT_AS``) and a CPU-time bound (``ITIMER_PROF``); a worker that dies or overruns is
reported as a crash or a hang (and replaced).  A loaded case is also built
(``scenarios.build``) for one VM of the file's ``per_vm`` plus its remainder
VM, so that nothing the loader accepts fails later.

Outcomes: ``loaded``, ``rejected`` (a well-formed ``ScenarioError``) and the
failures ``bad-error`` (another exception, or a message not of the form
``FILE:LINE: KEY: message``), ``build-error`` (loaded but the build failed),
``hang`` and ``crash``.  The exit status is 1 if there was any failure.
``tests/test_scenarios_fuzz.py`` runs a short campaign of this module.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import random
import re
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "kvmwake" / "scenarios" / "builtin"
#: Address space a worker may use beyond what it holds after importing kvmwake.
MEMORY_HEADROOM = 768 << 20
#: CPU seconds a single case may take (load and build), and the wall-clock bound
#: after which the parent gives up on a worker (the machine may be shared).
CASE_CPU_S = 10.0
CASE_TIMEOUT_S = 120.0


class CaseTimeout(BaseException):
    """Raised in a worker by SIGPROF when a case used up its CPU time."""
ERROR_FORM = re.compile(r"^(?P<file>.+?):(?P<line>[0-9]+): (?P<key>[^\n]+?): (?P<msg>.+)$",
                        re.S)
FAILURES = ("bad-error", "build-error", "hang", "crash")

_INTS = [0, 1, -1, 2, 7, 16, 255, 256, 1023, 1024, 1025, 4095, 4096, 65536, 1 << 20,
         (1 << 20) + 1, (1 << 24) + 1, 4_000_000_000, (1 << 31), (1 << 32), (1 << 32) - 1,
         (1 << 50) + 1, (1 << 62), (1 << 62) + 1, (1 << 63) - 1, -(1 << 63)]
_STRS = ["", "0", "20", "5 ms", "5ms", "0ms", "-1ms", "1.5us", "0.5ns", "1e9ms", "20 us",
         "18446744073709551616ns", "4611686018427387905ns", "99999999999999999999s",
         "146y", "4ms ", " 4ms", "spis", "all", "per-vcpu", "32:4000000000", "0:4000000000",
         "32:33", "1019:1020", "-5:3", "::0", "0::4", "1:", "1:2:3:4", "::", "x", "\\u0000",
         "(intid - 32) % nr_vcpus", "nr_vcpus", "1//0", "9" * 50, "edge", "level",
         "ARM_SYSTEM_SUSPEND", "x86", "arm64", "reference", "deny-all", "default"]
_OTHERS = ["true", "false", "1.5", "inf", "nan", "-0.0", "[]", "[1, 2]", "[-1]", "[40, 41]",
           '["1ms", "2ms"]', '["2ms", "1ms"]', "[\"spis\"]", "{}", "{ a = 1 }",
           "{ wake_to_run_ns = 99999999999999 }", "{ wake_to_run_ns = \"5 us\" }",
           "1979-05-27", "[[1]]", "0x40", "0o777", "1_000"]
_QUOTED = ['"a=b"', '"a]b"', "'x]y'", '"a.b"', '"[[x]]"', '"q\\"]"', "'='", '"= ]"',
           '"sim"', '"vm"', "''", '""', '"host.cpus"', "'a\"b'"]
_OPS_PLANTS = ["for v in 0..4000000000 {\n    compute 1us\n}",
               "for v in 0..4000000000 {\n}",
               "for a in 0..100000 {\n    for b in 0..100000 {\n        hvc\n    }\n}",
               "loop 4000000000 {\n    compute 1us\n    wfi\n}",
               "loop 18446744073709551616 {\n    wfi\n}",
               "compute 20", "compute 20 us", "compute 99999999999999s", "compute exp 0ns",
               "timer_arm 4611686018427387905ns", "timer_arm 1ms period=0",
               "wake 4000000000", "sgi 1 0,1,2,3,4,5,6,7,8,9,10,4000000000",
               "psci FN64_CPU_ON target=vcpu:4000000000 entry=@4000000000 context=0",
               "irq_enable 4000000000", "set_priority 1019 256", "loop {", "}", "{ }",
               "for v in 1..nr_vcpus*nr_vcpus*nr_vcpus {\n    wake $v\n}"]


def builtin_texts() -> dict:
    return {p.stem: p.read_text() for p in sorted(BUILTIN.glob("*.toml"))}


def _value_lines(text: str) -> list:
    """Indexes of lines that hold ``key = value`` (outside multi-line strings)."""
    out, inside = [], None
    for i, line in enumerate(text.split("\n")):
        if inside:
            if inside in line:
                inside = None
            continue
        m = re.match(r"\s*([A-Za-z0-9_\"'.-]+)\s*=\s*(.*)$", line)
        if m:
            out.append(i)
            for q in ('"""', "'''"):
                if m.group(2).count(q) == 1:
                    inside = q
    return out


def _rand_value(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.35:
        return str(rng.choice(_INTS))
    if k < 0.75:
        s = rng.choice(_STRS)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' \
            if rng.random() < 0.8 else "'" + s.replace("'", "") + "'"
    return rng.choice(_OTHERS)


def mutate(text: str, rng: random.Random, rounds: int | None = None) -> str:
    """One to three structure-aware mutations of a scenario file's text."""
    for _ in range(rounds or rng.choice((1, 1, 1, 2, 3))):
        lines = text.split("\n")
        vl = _value_lines(text)
        kind = rng.random()
        if kind < 0.40 and vl:                                # change a value
            i = rng.choice(vl)
            key = lines[i].split("=", 1)[0]
            rest = lines[i].split("=", 1)[1]
            if '"""' in rest or "'''" in rest:
                continue
            lines[i] = f"{key}= {_rand_value(rng)}"
        elif kind < 0.50 and vl:                              # delete a line
            i = rng.choice(vl)
            rest = lines[i].split("=", 1)[1]
            if '"""' in rest or "'''" in rest:
                continue
            del lines[i]
        elif kind < 0.58 and vl:                              # duplicate a line
            i = rng.choice(vl)
            lines.insert(i + rng.choice((0, 1)), lines[i])
        elif kind < 0.68:                                     # insert a quoted key
            i = rng.randrange(len(lines) + 1) if rng.random() < 0.3 else \
                (rng.choice(vl) + 1 if vl else 0)
            lines.insert(min(i, len(lines)), f"{rng.choice(_QUOTED)} = {_rand_value(rng)}")
        elif kind < 0.74 and vl:                              # rename a key, quoted
            i = rng.choice(vl)
            key, rest = lines[i].split("=", 1)
            key = key.strip()
            lines[i] = f'"{key}" ={rest}' if rng.random() < 0.5 else \
                f'"{key}={rng.choice(["", "]", "x"])}" ={rest}'
        elif kind < 0.79:                                     # a table header
            hdr = rng.choice(["[host]", "[vm]", "[[vm.program]]", "[[vm.source]]", "[vm.x]",
                              '["ho]st"]', "[[\"vm\".'program']]", "[host.costs]", "[[x]]",
                              '["a=b"]', "[vm.program]"])
            lines.insert(rng.randrange(len(lines) + 1), hdr)
        elif kind < 0.92:                                     # plant ops
            j = [n for n, ln in enumerate(lines) if ln.strip() in ("loop {", "ops = '''")]
            plant = rng.choice(_OPS_PLANTS)
            if j:
                n = rng.choice(j)
                lines[n + 1:n + 1] = plant.split("\n")
            else:
                lines += ["[[vm.program]]", 'vcpus = "all"', "ops = '''", *plant.split("\n"),
                          "'''"]
        elif kind < 0.96:                                     # flip bytes
            t = list("\n".join(lines))
            for _ in range(rng.randint(1, 3)):
                if t:
                    t[rng.randrange(len(t))] = rng.choice('[]{}=".\'#\n\\0x9')
            lines = "".join(t).split("\n")
        else:                                                 # cut the file
            t = "\n".join(lines)
            lines = t[:rng.randrange(len(t) + 1)].split("\n")
        text = "\n".join(lines)
    return text


def cases(n: int, seed: int = 0):
    """``n`` (case_number, base name, text) cases, deterministic in ``seed``."""
    bases = builtin_texts()
    names = sorted(bases)
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        name = names[i % len(names)]
        yield i, name, mutate(bases[name], rng)


# -- running a case (in a worker) --------------------------------------------------------

def check_case(path: str) -> tuple[str, str]:
    """Load the file and build it small; (outcome, detail)."""
    from kvmwake import scenarios
    from kvmwake.errors import ScenarioError
    try:
        sc = scenarios.load(path)
    except ScenarioError as exc:
        msg = str(exc)
        m = ERROR_FORM.match(msg)
        if not m or m.group("file") != path:
            return "bad-error", f"ScenarioError not of the form FILE:LINE: KEY: {msg!r}"
        return "rejected", msg
    except BaseException as exc:                          # noqa: BLE001 (what we look for)
        if isinstance(exc, (KeyboardInterrupt, CaseTimeout)):
            raise
        return "bad-error", "".join(traceback.format_exception_only(type(exc), exc)).strip() \
            + "\n" + traceback.format_exc(limit=-4)
    per = sc.vcpus_per_vm
    n = per + sc.vcpus % per if sc.vcpus > per else sc.vcpus
    try:
        scenarios.build(sc, vcpus=n, sim_ns=min(sc.sim_ns, 1000), trace_capacity=0)
    except BaseException as exc:                          # noqa: BLE001
        if isinstance(exc, (KeyboardInterrupt, CaseTimeout)):
            raise
        return "build-error", f"{type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=-4)
    return "loaded", ""


def _limit_memory(headroom: int) -> None:
    import resource
    with open("/proc/self/statm") as fh:
        vsz = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + headroom, vsz + headroom))


def _worker(conn, tmpdir: str, headroom: int) -> None:
    sys.path.insert(0, str(ROOT))
    import kvmwake.scenarios  # noqa: F401  (import before the limit)
    import numpy  # noqa: F401
    import signal
    _limit_memory(headroom)

    def on_prof(signum, frame):
        raise CaseTimeout
    signal.signal(signal.SIGPROF, on_prof)
    path = os.path.join(tmpdir, f"case-{os.getpid()}.toml")
    while True:
        job = conn.recv()
        if job is None:
            return
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(job)
        try:
            signal.setitimer(signal.ITIMER_PROF, CASE_CPU_S)
            result = check_case(path)
        except MemoryError:
            result = ("bad-error", "MemoryError")
        except CaseTimeout:
            result = ("hang", f"over {CASE_CPU_S:g} s of CPU time")
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        conn.send(result)


class Pool:
    """Workers that each run one case at a time under a memory and time bound."""

    def __init__(self, workers: int, tmpdir: str, headroom: int = MEMORY_HEADROOM,
                 timeout: float = CASE_TIMEOUT_S):
        self.tmpdir, self.headroom, self.timeout = tmpdir, headroom, timeout
        self.ctx = mp.get_context("spawn")
        self.slots = [self._start() for _ in range(max(1, workers))]

    def _start(self):
        a, b = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(b, self.tmpdir, self.headroom), daemon=True)
        p.start()
        b.close()
        return [p, a, None, 0.0]            # process, pipe, running job, its start

    def run(self, jobs):
        """Yield (job_id, outcome, detail) for jobs [(job_id, text)]."""
        jobs = list(jobs)[::-1]
        busy = 0
        while jobs or busy:
            for s in self.slots:
                if s[2] is None and jobs:
                    jid, text = jobs.pop()
                    s[1].send(text)
                    s[2], s[3] = jid, time.monotonic()
                    busy += 1
            ready = mp.connection.wait([s[1] for s in self.slots if s[2] is not None]
                                       + [s[0].sentinel for s in self.slots
                                          if s[2] is not None], timeout=0.2)
            now = time.monotonic()
            for k, s in enumerate(self.slots):
                if s[2] is None:
                    continue
                result = None
                if s[1] in ready:
                    try:
                        result = s[1].recv()
                    except (EOFError, OSError):
                        result = ("crash", f"worker died (exit {s[0].exitcode})")
                elif s[0].sentinel in ready or not s[0].is_alive():
                    s[0].join(1)
                    result = ("crash", f"worker died (exit {s[0].exitcode})")
                elif now - s[3] > self.timeout:
                    result = ("hang", f"no answer within {self.timeout:g} s")
                if result is None:
                    continue
                jid = s[2]
                s[2] = None
                busy -= 1
                if result[0] in ("crash", "hang"):
                    s[0].kill()
                    s[0].join()
                    self.slots[k] = self._start()
                yield (jid, *result)

    def close(self):
        for s in self.slots:
            try:
                s[1].send(None)
            except OSError:
                pass
            s[0].join(2)
            if s[0].is_alive():
                s[0].kill()
                s[0].join()


def campaign(n: int, seed: int = 0, workers: int = 2, tmpdir: str | None = None,
             save: str | None = None, log=None) -> dict:
    """Run ``n`` cases; returns counts per outcome and the failures."""
    import tempfile
    own = tmpdir is None
    tmpdir = tmpdir or tempfile.mkdtemp(prefix="kvmwake-fuzz-")
    counts = {k: 0 for k in ("loaded", "rejected", *FAILURES)}
    failures = []
    texts = {}
    pool = Pool(workers, tmpdir)
    t0 = time.monotonic()
    try:
        def jobs():
            for i, name, text in cases(n, seed):
                texts[i] = (name, text)
                yield i, text
        for done, (jid, outcome, detail) in enumerate(pool.run(jobs()), 1):
            counts[outcome] += 1
            name, text = texts.pop(jid)
            if outcome in FAILURES:
                failures.append({"case": jid, "base": name, "outcome": outcome,
                                 "detail": detail, "text": text})
                if save:
                    os.makedirs(save, exist_ok=True)
                    pathlib.Path(save, f"case-{jid}-{outcome}.toml").write_text(
                        text, errors="surrogatepass")
            if log and done % 1000 == 0:
                log(f"{done}/{n} cases, {time.monotonic() - t0:.0f} s: {counts}")
    finally:
        pool.close()
        if own:
            import shutil
            shutil.rmtree(tmpdir, ignore_errors=True)
    return {"counts": counts, "failures": failures, "seconds": time.monotonic() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--save-failures", metavar="DIR")
    args = ap.parse_args(argv)
    res = campaign(args.cases, args.seed, args.workers, save=args.save_failures,
                   log=lambda m: print(m, file=sys.stderr))
    c = res["counts"]
    print(f"{args.cases} cases (seed {args.seed}) in {res['seconds']:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in c.items()))
    for f in res["failures"][:20]:
        print(f"case {f['case']} ({f['base']}): {f['outcome']}: {f['detail']}")
    return 1 if any(c[k] for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
