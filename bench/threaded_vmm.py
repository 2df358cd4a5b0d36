#!/usr/bin/env python
"""A VMM's own threads on the model (``VCpu.attach``; kvmwake/vcpu_threads.py).

    python bench/threaded_vmm.py [--vcpus 64,256] [--rounds 5] [--wakes 500] [--no-kernel]

Two reports:

1. **Threaded against callback.**  The same guest programs, run once by a
   callback policy (``vm.run(vmm=...)``, one thread) and once by one Python
   thread per vCPU looping on ``run()``.  Each vCPU wakes a random other,
   halts (its timer bounds the halt) and exits to userspace with a ucall SYNC
   after every ``--halts-per-exit`` halts.  Reported: simulated halts per wall
   second in each mode (median of ``--rounds`` runs, the modes alternated in
   each round, each in a fresh host, build not timed), their ratio, and the
   exits per wall second.  The two modes give the same exits and stats
   (checked every round).  Beside them, the floor this machine puts under
   any thread-per-vCPU design: one hand-off between two Python threads
   blocked on locks (half a ping-pong round trip; median of 20,000).
2. **Real time: kick to run.**  ``Host.set_realtime(1.0)``: one x86 vCPU
   thread halts in ``run()``; a device thread sends an MSI (``signal_msi``)
   after each gap of the kernel harness's ``mixed`` idle distribution, and
   the guest's handler exits with a port I/O ucall.  Per wake: wall time from
   just before ``signal_msi`` to just after the vCPU thread's ``run()``
   returns (kick to the woken thread running), and the model's own share
   (the exit's virtual time minus the send's).  Next to it, measured in the
   same command: the real KVM's MSI-to-exit latency on this machine
   (``kvmwake.kernel.record.kernel_msi_to_exit``: the injector's
   ``KVM_SIGNAL_MSI`` to the vCPU thread's return from ``KVM_RUN``, the
   same two ends), skipped without ``/dev/kvm`` or with ``--no-kernel``.
   p50 / p90 / p99 and the kernel's log2 histogram (``halt_wait_hist``'s
   layout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

import kvmwake as kw
from kvmwake import guest as G

US = 1_000


# -- 1. threaded against callback -------------------------------------------------------

def build(n: int, per_exit: int, rounds: int, seed: int = 0):
    vm = kw.VM(nr_vcpus=n, host_cpus=max(1, n // 2), seed=seed, trace_capacity=0)
    body = [G.compute_exp(20 * US), G.wake_random_other(), G.timer_arm(50 * US), G.wfi()]
    for i, v in enumerate(vm.vcpus):
        inner = G.loop(body, per_exit) if per_exit > 1 else body
        v.load([G.loop([*(inner if per_exit == 1 else [inner]), G.sync(i)], rounds), G.end()])
    return vm


class CountVmm(kw.vmm.Vmm):
    def __init__(self):
        self.exits = 0

    def handle_exit(self, vcpu, ex):
        self.exits += 1
        return ex.ucall == "SYNC"


def run_callback(n, per_exit, rounds):
    vm = build(n, per_exit, rounds)
    pol = CountVmm()
    t0 = time.perf_counter()
    vm.run(1 << 40, vmm=pol)
    wall = time.perf_counter() - t0
    return wall, vm.host.halts, pol.exits, vm.stats_array().tobytes()


def run_threaded(n, per_exit, rounds):
    vm = build(n, per_exit, rounds)
    for v in vm.vcpus:
        v.attach()
    counts = [0] * n

    def loop(v):
        with v:
            while True:
                ex = v.run(timeout_ns=1 << 40)
                counts[v.id] += 1
                if ex.ucall != "SYNC":
                    return
    ts = [threading.Thread(target=loop, args=(v,)) for v in vm.vcpus]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return wall, vm.host.halts, sum(counts), vm.stats_array().tobytes()


def handoff_floor(n: int = 20_000) -> float:
    """ns for one hand-off between two threads blocked on locks (median of n)."""
    a, b = threading.Lock(), threading.Lock()
    a.acquire()
    b.acquire()
    samples = []

    def other():
        for _ in range(n):
            a.acquire()
            b.release()
    t = threading.Thread(target=other)
    t.start()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        a.release()
        b.acquire()
        samples.append(time.perf_counter_ns() - t0)
    t.join()
    return statistics.median(samples) / 2


def report_modes(sizes, per_exits, rounds, iterations):
    print("## Threaded against callback (halts per wall second, median of "
          f"{rounds} rounds)\n")
    print(f"hand-off floor on this machine: {handoff_floor():,.0f} ns per hand-off "
          "between two threads blocked on locks\n")
    print("| vCPU threads | halts per exit | halts | exits | callback halts/s | "
          "threaded halts/s | threaded / callback | threaded exits/s | us per exit, threaded |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for per_exit in per_exits:
            cb, th = [], []
            for r in range(rounds):
                order = (run_callback, run_threaded) if r % 2 == 0 else (run_threaded, run_callback)
                res = {f: f(n, per_exit, iterations) for f in order}
                wc, hc, ec, sc = res[run_callback]
                wt, ht, et, st = res[run_threaded]
                if (hc, ec, sc) != (ht, et, st):
                    raise SystemExit(f"{n} vCPUs: the threaded run differs from the callback "
                                     "run")
                cb.append(hc / wc)
                th.append(ht / wt)
            cbm, thm = statistics.median(cb), statistics.median(th)
            exits_s = thm / hc * et
            print(f"| {n} | {per_exit} | {hc:,} | {et:,} | {cbm:,.0f} | {thm:,.0f} | "
                  f"{thm / cbm:.3f} | {exits_s:,.0f} | {1e6 / exits_s:.1f} |", flush=True)


# -- 2. real time: kick to run --------------------------------------------------------------

def model_kick_to_run(wakes: int, seed: int):
    """Per wake: wall ns from the send to the vCPU thread's return, and virtual ns."""
    from kvmwake.kernel import workload
    gaps = workload.draw_gaps("mixed", wakes, seed=seed)
    vm = kw.VM(arch="x86", nr_vcpus=1, host_cpus=2, seed=seed, trace_capacity=0)
    v = vm.vcpus[0]
    v.load([G.sti(), G.loop([G.hlt(), G.sync(0)])])
    v.attach()
    vm.host.set_realtime(1.0)
    sent, got = [], []
    ready = threading.Semaphore(0)

    def vcpu():
        with v:
            for _ in range(wakes):
                ex = v.run(timeout_ns=1 << 50)
                got.append((time.perf_counter_ns(), ex.time_ns))
                ready.release()

    def device():
        for gap in gaps:
            end = time.perf_counter_ns() + int(gap)
            while time.perf_counter_ns() < end:       # as the harness's injector:
                time.sleep(max(0.0, (end - time.perf_counter_ns()) / 1e9 - 50e-6))
            t = time.perf_counter_ns()
            vm.signal_msi(0xFEE00000, 0xEC)
            # (signal_msi brought the clock to the wall clock's time, then sent.)
            sent.append((t, vm.host.vcpu_threads.last_sync_ns))
            ready.acquire()                            # one wake at a time
    a, b = threading.Thread(target=vcpu), threading.Thread(target=device)
    a.start()
    b.start()
    b.join()
    a.join()
    wall = np.array([g[0] - s[0] for s, g in zip(sent, got)], dtype=np.int64)
    virt = np.array([g[1] - s[1] for s, g in zip(sent, got)], dtype=np.int64)
    return wall, virt


def fmt_hist(hist) -> str:
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        return "-"
    return " ".join(f"[{(1 << (i - 1)) if i else 0}ns..):{c}" for i, c in enumerate(hist)
                    if nz[0] <= i <= nz[-1] and c)


def report_realtime(wakes: int, seed: int, kernel: bool):
    from kvmwake.kernel.analysis import latency_summary
    print(f"\n## Real time: kick to run ({wakes} wakes, idle 'mixed', seed {seed})\n")
    rows = []
    if kernel:
        try:
            from kvmwake.kernel.record import kernel_msi_to_exit
            k = kernel_msi_to_exit(wakes=wakes, seed=seed)
            rows.append(("kernel: KVM_SIGNAL_MSI to KVM_RUN's return", k))
            print(f"kernel {k['kernel']}, host load during the recording: {k['host_load']}\n")
        except Exception as exc:                       # noqa: BLE001 (reported, not fatal)
            print(f"(kernel recording skipped: {exc})\n")
    wall, virt = model_kick_to_run(wakes, seed)
    rows.append(("model, real time: signal_msi to run()'s return (wall)",
                 latency_summary(wall)))
    rows.append(("model: its virtual share (the exit's time - the send's)",
                 latency_summary(virt)))
    print("| what | n | p50 us | p90 us | p99 us |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s['n']} | {s['p50_ns'] / 1e3:.1f} | {s['p90_ns'] / 1e3:.1f} | "
              f"{s['p99_ns'] / 1e3:.1f} |")
    print()
    for name, s in rows:
        print(f"{name}: log2 histogram {fmt_hist(s['hist'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vcpus", default="64,256", help="vCPU thread counts (comma list)")
    ap.add_argument("--halts-per-exit", default="1,10", help="halts between two SYNC exits")
    ap.add_argument("--iterations", type=int, default=40, help="SYNC exits per vCPU")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wakes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel recording")
    ap.add_argument("--only", choices=("modes", "realtime"), default=None)
    args = ap.parse_args(argv)
    print(f"kvmwake {kw.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}\n")
    if args.only != "realtime":
        report_modes([int(x) for x in args.vcpus.split(",")],
                     [int(x) for x in args.halts_per_exit.split(",")], args.rounds,
                     args.iterations)
    if args.only != "modes":
        report_realtime(args.wakes, args.seed, not args.no_kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
