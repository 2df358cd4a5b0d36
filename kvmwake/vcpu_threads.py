"""A VMM's own threads on the model: one thread per vCPU blocked in ``VCpu.run()``.

A real VMM runs one thread per vCPU, each looping on ``KVM_RUN``, and control
threads beside them.  ``VCpu.attach()`` lets a Python thread do the same on a
kvmwake host: its ``run()`` blocks that thread on the vCPU's own wait object
(a lock, so a futex, slept on without the GIL) until the vCPU has an exit to
report, and the engine advances virtual time on whichever blocked thread the
host picks to drive it.

Virtual time stays deterministic (``VcpuThreads``, "The rules"): the clock
moves only while no attached thread is in userspace, and the threads that are
in userspace take turns (one holds the *userspace token* at a time), in an
order fixed by the model, not by the OS.  So the same VMM code gives the same
exits, stats and snapshot bytes on every run.

Which calls block and which fail, as the kernel does it:

* vCPU ioctls (``KVM_GET/SET_MP_STATE``, ``KVM_GET/SET_ONE_REG``,
  ``KVM_ARM_VCPU_INIT``) take ``vcpu->mutex`` (``kvm_vcpu_ioctl``:
  ``mutex_lock_killable``), which ``KVM_RUN`` holds: from another thread they
  **block** until the vCPU's thread is out of ``KVM_RUN``.
* VM ioctls (``KVM_IRQ_LINE``, ``KVM_SIGNAL_MSI``) and a signal to the thread
  take no vCPU mutex: they act at once.
* What locks every vCPU (the vGIC's register access, ``kvm_trylock_all_vcpus``,
  and a snapshot) fails with **EBUSY** while any vCPU is in ``KVM_RUN``.
"""

from __future__ import annotations

import collections
import errno
import threading
import time
import warnings

from .errors import DeadlockError, KvmError
from .exits import from_engine

__all__ = ["VcpuThreads", "ClockHold", "DeadlockError", "DEFAULT_DEADLOCK_TIMEOUT_S",
           "STARTING", "IN_RUN", "READY", "ACTIVE", "PARKED"]

#: Wall time without progress (no token passed, no virtual time) after which the
#: threads waiting on a clock that an attached thread holds are told of a deadlock.
DEFAULT_DEADLOCK_TIMEOUT_S = 10.0
#: How often a blocked thread looks for a deadlock (wall seconds).
_POLL_S = 0.25
#: Real time: a driving thread whose next event is due sooner than this (wall
#: seconds) spins for it, yielding the GIL, rather than sleeping on a timer.
RT_SPIN_S = 0.0002
#: The wall time the driving thread simulates for, at most about, before it lets
#: other Python threads (control threads) call into the host; the virtual length
#: of a chunk adapts to it (``VcpuThreads._drive``).
CHUNK_WALL_S = 0.002

# An attached vCPU's thread, as the host sees it.
STARTING = "starting"     # attached, before its first run(): holds the clock
IN_RUN = "in KVM_RUN"     # blocked in run()
READY = "exited"          # its exit is made; waits for the token to return it
ACTIVE = "in userspace"   # holds the token: the VMM's code runs
PARKED = "parked"         # in userspace, waiting for unpark(): holds nothing


class _Waiter:
    """One thread blocked in kvmwake, on a lock of its own (a futex underneath)."""

    __slots__ = ("sem", "posted", "holder", "granted", "error", "fail", "target", "kind",
                 "blocked")

    def __init__(self, kind: str, holder, target: int = 0):
        self.sem = threading.Lock()
        self.sem.acquire()
        self.posted = False
        self.kind = kind          # "run", "time", "token", "mutex", "park"
        self.holder = holder      # who holds the token once this waiter is granted it
        self.granted = False
        self.error = None         # raised at once (a deadlock)
        self.fail = None          # raised once granted (the watchdog's ETIMEDOUT)
        self.target = target      # "time": the virtual time it waits for
        self.blocked = False      # a thread sleeps on it (a hold made with wait=False
        #                           has none until ClockHold.wait)


def _due(w: _Waiter) -> int:
    """When an inside waiter needs the driver: its watchdog, or its time."""
    return w.holder.deadline if w.kind == "run" else w.target


class _Slot:
    """An attached vCPU."""

    __slots__ = ("vcpu", "g", "state", "owner", "waiter", "deadline", "timeout", "warn",
                 "signalled_at", "warning")

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.g = vcpu._g
        self.state = STARTING
        self.owner = None         # the thread that calls run(), bound by its first run()
        self.waiter = None
        self.deadline = 0
        self.timeout = 0
        self.warn = False
        self.signalled_at = None
        self.warning = None

    @property
    def thread(self):
        return self.owner

    def name(self) -> str:
        v = self.vcpu
        return f"vCPU {v.id} of VM {v.vm.index}"


class ClockHold:
    """The userspace token held by a thread that is not a vCPU's (``Host.hold_clock``):
    the clock stands still until ``release()``.  A context manager.

    ``time_ns`` is the virtual time it was granted at; ``held`` says whether it is
    held now."""

    def __init__(self, coord: "VcpuThreads", thread):
        self._coord = coord
        self.thread = thread
        self.time_ns = 0
        self.held = False
        self._waiter = None       # while it waits to be granted

    def wait(self) -> "ClockHold":
        """Block until a hold made with ``hold_clock(..., wait=False)`` is granted
        (at once if it already was); the calling thread then holds it."""
        self._coord._wait_registered(self)
        return self

    def wait_until(self, at_ns: int) -> "ClockHold":
        """Let the clock go until virtual time ``at_ns`` and hold it there again, in
        one step: no other thread can take the token in between and make the
        hold late, which a ``release()`` followed by ``hold_clock(at_ns=...)``
        could not promise."""
        self._coord._hold_until(self, at_ns)
        return self

    def name(self) -> str:
        return f"the clock hold of thread {self.thread.name!r}"

    def release(self) -> None:
        """Let the clock move again (once; a second call does nothing).  A hold made
        with ``wait=False`` and never waited for is withdrawn."""
        self._coord._release_hold(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class _MutexHold(ClockHold):
    """The token for the length of one vCPU ioctl of a thread that holds nothing."""

    def name(self) -> str:
        return f"a vCPU ioctl of thread {self.thread.name!r}"


class VcpuThreads:
    """The host's vCPU threads: who may run the clock, who holds the userspace token.

    The rules (what makes a threaded VMM's run deterministic):

    1. An attached thread is either in ``KVM_RUN`` (blocked in ``run()``), or
       in userspace.  In userspace it holds the **token** (its code runs; the
       clock stands still), waits for it, or is **parked** (``VCpu.park()``:
       it waits for ``unpark()`` and holds nothing).  A thread that is not a
       vCPU's takes the token with ``Host.hold_clock()``.
    2. The clock moves only while nobody holds or waits for the token and no
       attached vCPU is still to make its first ``run()`` (or ``park()``); then
       a thread blocked in ``run()`` (or waiting for a time in ``hold_clock``)
       drives it.
    3. Exits made at one instant are returned in VM and vCPU order, one thread
       at a time: the next thread gets the token when the previous one
       re-enters ``run()``, parks, or detaches.  (The order the callback
       policy of ``vm.run`` handles them in, so both give the same run.)
    4. A thread blocked in a vCPU ioctl on a vCPU in ``KVM_RUN`` gives the
       token back while it waits, and gets it when that vCPU exits, before
       that vCPU's own thread does.  ``unpark()`` and ``hold_clock()`` queue
       for the token in the order they were called.
    5. The first ``run()`` of every attached vCPU enters ``KVM_RUN`` together,
       in VM and vCPU order, once none is left to make it.
    """

    def __init__(self, host):
        self.host = host
        self.eng = host._engine
        self.lock = threading.Lock()
        self.slots: dict = {}                     # g -> _Slot
        self.users: set = set()                   # holders of the token (_Slot, ClockHold)
        self.ready: collections.deque = collections.deque()
        self.inside: dict = {}                    # waiters that may drive the clock (as keys)
        self.mutex_waiters: dict = {}             # g -> [waiter]
        self.entries: list = []                   # first entries still to make
        self.starting = 0
        self.driver = None
        self.progress = time.monotonic()
        self.deadlock_timeout_s = DEFAULT_DEADLOCK_TIMEOUT_S
        self.failed = None                        # a DeadlockError's message, once failed
        self.chunk_ns = 1_000_000                 # virtual length of a chunk (_drive)
        self.rt = None                            # real time: (rate, wall0 ns, virtual0 ns)
        self.last_sync_ns = 0                     # virtual time of the last sync_to_wall
        self.next_due = (1 << 64) - 1             # <= every inside waiter's deadline

    # -- state ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while some vCPU is attached or some thread holds or waits for the clock."""
        return bool(self.slots) or bool(self.users) or bool(self.ready) or bool(self.inside)

    def slot_of(self, vcpu):
        return self.slots.get(vcpu._g)

    def state_of(self, vcpu) -> str | None:
        s = self.slots.get(vcpu._g)
        return None if s is None else s.state

    def _clock_free(self) -> bool:
        if self.rt is not None:
            return self.starting == 0
        return not self.users and not self.ready and self.starting == 0

    def _held_by(self, thread):
        """The token ``thread`` holds (a _Slot or a ClockHold), or None."""
        for u in self.users:
            if u.thread is thread:
                return u
        return None

    def _check_failed(self):
        if self.failed is not None:
            raise DeadlockError(self.failed)

    # -- attach / detach ------------------------------------------------------------

    def attach(self, vcpu) -> None:
        with self.lock:
            self._check_failed()
            if vcpu._g in self.slots:
                raise RuntimeError(f"vCPU {vcpu.id} of VM {vcpu.vm.index} is already attached")
            if not vcpu.outside_run:
                raise KvmError(errno.EBUSY, f"attach: vCPU {vcpu.id} is inside KVM_RUN (started "
                                            "by vm.run or vcpu.run); signal it out first")
            if vcpu._held is not None:
                raise RuntimeError(f"attach: vCPU {vcpu.id} has an exit not yet returned; "
                                   "take it with vcpu.run() first")
            if not vcpu._loaded:
                raise KvmError(errno.ENOEXEC, f"attach: vCPU {vcpu.id} has no guest program")
            self.slots[vcpu._g] = _Slot(vcpu)
            self.starting += 1
            self.progress = time.monotonic()

    def detach(self, vcpu) -> None:
        with self.lock:
            s = self.slots.get(vcpu._g)
            if s is None:
                raise RuntimeError(f"detach: vCPU {vcpu.id} of VM {vcpu.vm.index} is not "
                                   "attached")
            if s.state == ACTIVE:
                if s.owner is not threading.current_thread() and s.owner.is_alive():
                    raise RuntimeError(f"detach: {s.name()} is in userspace in thread "
                                       f"{s.owner.name!r}; only that thread may detach it")
            elif s.state != STARTING:
                raise RuntimeError(f"detach: {s.name()} is {s.state}; detach it from its "
                                   "own thread once run() returned")
            del self.slots[vcpu._g]
            if s.state == STARTING:
                self.starting -= 1
            self.users.discard(s)
            self.progress = time.monotonic()
            self._advance()

    # -- KVM_RUN --------------------------------------------------------------------

    def run(self, vcpu, timeout_ns: int, warn: bool, immediate_exit: bool):
        """``VCpu.run`` of an attached vCPU: block until its exit (rules 1-5)."""
        me = threading.current_thread()
        eng = self.eng
        with self.lock:
            self._check_failed()
            s = self.slots.get(vcpu._g)
            if s is None:
                raise RuntimeError(f"vCPU {vcpu.id} of VM {vcpu.vm.index} is not attached, "
                                   "while others of this host are: attach it (VCpu.attach) "
                                   "before its thread calls run()")
            if s.owner is not me:
                if s.owner is not None and s.owner.is_alive():
                    raise RuntimeError(f"run: {s.name()} belongs to thread {s.owner.name!r} "
                                       f"(its first run()), not {me.name!r}")
                s.owner = me                  # its first run(), or its thread ended
            if s.state not in (STARTING, ACTIVE):
                raise RuntimeError(f"run: {s.name()} is {s.state}")
            if immediate_exit:
                raise KvmError(errno.EINTR, f"KVM_RUN with immediate_exit: vCPU {vcpu.id} "
                                            "returns at once, exit_reason unchanged "
                                            f"({vcpu.exit_reason.name})")
            s.timeout, s.warn, s.signalled_at, s.warning = timeout_ns, warn, None, None
            s.deadline = min(eng.now + timeout_ns, (1 << 64) - 1)
            w = _Waiter("run", s)
            s.waiter = w
            if s.state == STARTING:
                self.starting -= 1
                self.entries.append(s)
            else:
                vcpu._started = True
                eng.start_vcpu(s.g)
                self.users.discard(s)
            s.state = IN_RUN
            self._enter(w)
            if self.driver is None:
                self.driver = w           # the thread entering KVM_RUN drives: no wake-up
            self.progress = time.monotonic()
            self._advance()
        self._block(w)
        # The token is ours: the exit goes back to this thread.
        s.state = ACTIVE
        held, vcpu._held = vcpu._held, None
        if s.warning is not None:
            warnings.warn(s.warning, RuntimeWarning, stacklevel=3)
        if w.fail is not None:
            raise w.fail
        return from_engine(held)

    # -- park / unpark ----------------------------------------------------------------

    def park(self, vcpu) -> None:
        me = threading.current_thread()
        with self.lock:
            self._check_failed()
            s = self.slots.get(vcpu._g)
            first = s is not None and s.state == STARTING and (
                s.owner is None or s.owner is me or not s.owner.is_alive())
            if not first and (s is None or s.state != ACTIVE or s.owner is not me):
                raise RuntimeError(f"park: vCPU {vcpu.id} of VM {vcpu.vm.index} is not in "
                                   "userspace in this thread (park it from its own thread, "
                                   "after run() returned, or before its first run())")
            if first:
                # A vCPU thread that starts stopped (QEMU's): it binds the vCPU and
                # stops holding the clock until unpark().
                s.owner = me
                self.starting -= 1
            w = _Waiter("park", s)
            s.waiter = w
            s.state = PARKED
            self.users.discard(s)
            self.progress = time.monotonic()
            self._advance()
        self._block(w)
        s.state = ACTIVE

    def unpark(self, vcpu) -> None:
        with self.lock:
            self._check_failed()
            s = self.slots.get(vcpu._g)
            if s is None or s.state != PARKED:
                raise RuntimeError(f"unpark: vCPU {vcpu.id} of VM {vcpu.vm.index} is not "
                                   "parked")
            s.state = READY
            self.ready.append(s.waiter)
            self.progress = time.monotonic()
            self._advance()

    # -- the clock held by other threads -------------------------------------------------

    def hold_clock(self, at_ns: int | None, wait: bool = True) -> ClockHold:
        me = threading.current_thread()
        with self.lock:
            self._check_failed()
            if wait and self._held_by(me) is not None:
                raise RuntimeError(f"hold_clock: thread {me.name!r} already holds the clock "
                                   f"({self._held_by(me).name()})")
            for s in self.slots.values():
                if wait and s.owner is me and s.state != ACTIVE:
                    raise RuntimeError(f"hold_clock: thread {me.name!r} runs {s.name()}, "
                                       f"which is {s.state}")
            self._check_future("hold_clock", at_ns)
            h = ClockHold(self, me)
            h._waiter = self._register(h, at_ns)
            self._advance()
        if wait:
            self._wait_granted(h)
        return h

    def _check_future(self, what: str, at_ns) -> None:
        if at_ns is not None and at_ns < self.eng.now:
            raise ValueError(
                f"{what}: at_ns = {at_ns} is past: the clock is at {self.eng.now} ns.  Ask "
                "before it can pass: while an attached vCPU has not made its first run(), "
                "with hold_clock(at_ns, wait=False) before the vCPU threads start, or from "
                "an earlier hold with ClockHold.wait_until")

    def _register(self, h: ClockHold, at_ns) -> _Waiter:
        """Queue ``h`` for the token now, or for when the clock reaches ``at_ns``."""
        if at_ns is None or at_ns <= self.eng.now:
            w = _Waiter("token", h)
            self.ready.append(w)
        else:
            w = _Waiter("time", h, at_ns)
            self._enter(w)
        return w

    def _wait_granted(self, h: ClockHold) -> None:
        self._block(h._waiter)
        with self.lock:
            h._waiter = None
            h.held = True
            h.time_ns = self.eng.now

    def _wait_registered(self, h: ClockHold) -> None:
        me = threading.current_thread()
        with self.lock:
            if h._waiter is None:
                raise RuntimeError("ClockHold.wait: this hold is not waiting to be granted "
                                   "(made with wait=False, not yet waited for)")
            other = self._held_by(me)
            if other is not None and other is not h:
                raise RuntimeError(f"ClockHold.wait: thread {me.name!r} already holds the "
                                   f"clock ({other.name()})")
            h.thread = me
        self._wait_granted(h)

    def _hold_until(self, h: ClockHold, at_ns: int) -> None:
        with self.lock:
            self._check_failed()
            if not h.held or h not in self.users:
                raise RuntimeError("ClockHold.wait_until: the hold is not held")
            self._check_future("ClockHold.wait_until", at_ns)
            self.users.discard(h)
            h.held = False
            h.thread = threading.current_thread()
            h._waiter = self._register(h, at_ns)
            self.progress = time.monotonic()
            self._advance()
        self._wait_granted(h)

    def _release_hold(self, h: ClockHold) -> None:
        with self.lock:
            w = h._waiter
            if w is not None and not h.held:
                # Registered (wait=False), never waited for: withdrawn, or, if it was
                # granted meanwhile, given back.
                h._waiter = None
                if w.granted:
                    self.users.discard(h)
                elif w in self.inside:
                    del self.inside[w]
                    if self.driver is w:
                        self.driver = None
                elif w in self.ready:
                    self.ready.remove(w)
                self.progress = time.monotonic()
                self._advance()
                return
            if not h.held:
                return
            h.held = False
            if h in self.users:
                self.users.discard(h)
                self.progress = time.monotonic()
                self._advance()

    # -- vcpu->mutex ----------------------------------------------------------------------

    def vcpu_mutex(self, vcpu):
        """Wait for ``vcpu`` to be out of ``KVM_RUN`` (rule 4).  Returns a hold to
        release after the ioctl (a ``_MutexHold``), or None when nothing waited or
        the caller keeps the token it had."""
        me = threading.current_thread()
        with self.lock:
            self._check_failed()
            s = self.slots.get(vcpu._g)
            if s is None or s.state != IN_RUN:
                return None
            if s.owner is me:
                raise RuntimeError(f"{s.name()} is in KVM_RUN in this very thread")
            for o in self.slots.values():
                if o.owner is me and o.state != ACTIVE:
                    raise RuntimeError(f"thread {me.name!r} runs {o.name()}, which is "
                                       f"{o.state}")
            mine = self._held_by(me)
            if mine is not None:
                holder, temp = mine, None
                self.users.discard(mine)       # the clock may move while it waits
            else:
                holder = temp = _MutexHold(self, me)
            w = _Waiter("mutex", holder)
            self.mutex_waiters.setdefault(s.g, []).append(w)
            self.progress = time.monotonic()
            self._advance()
        self._block(w)
        if temp is not None:
            temp.held = True
        return temp

    # -- snapshots ----------------------------------------------------------------------

    def check_all_outside(self, what: str) -> None:
        """EBUSY while an attached vCPU's thread is in KVM_RUN (every vCPU mutex is
        taken, as ``kvm_trylock_all_vcpus`` does)."""
        for s in self.slots.values():
            if s.state == IN_RUN:
                raise KvmError(errno.EBUSY, f"{what}: {s.name()} is in KVM_RUN in thread "
                                            f"{s.owner.name if s.owner else '?'!r}; park it "
                                            "or let it exit first")

    # -- real time ------------------------------------------------------------------------

    def set_realtime(self, rate) -> None:
        """Pace virtual time to the monotonic clock (``rate`` virtual ns per wall ns),
        or, with None, go back to the deterministic clock.

        In real time the clock does not wait for threads in userspace: each thread
        gets its exit as soon as it is made (rule 3 is off, and so is
        determinism), the driving thread sleeps until the wall time of the next
        event, and a call that injects (``irq_line``, ``signal_msi``, ``kick``,
        ``signal``, ...) from any thread first brings the clock to the wall
        clock's time, so it acts when it is made.  The clock never runs ahead of
        the wall clock; it lags while no thread is in ``run()`` and catches up."""
        with self.lock:
            self._check_failed()
            if rate is None:
                if len(self.users) > 1 or (self.users and self.ready):
                    raise RuntimeError("set_realtime(None): several threads are in "
                                       "userspace at once; let them re-enter run() first")
                self.rt = None
            else:
                self.rt = (float(rate), time.monotonic_ns(), self.eng.now)
            self.progress = time.monotonic()
            self._advance()
            if self.driver is not None:
                self._post(self.driver)

    def _wall_virtual(self) -> int:
        rate, wall0, virt0 = self.rt
        return virt0 + int((time.monotonic_ns() - wall0) * rate)

    def sync_to_wall(self) -> None:
        """Real time: bring the clock to the wall clock's time before an injection."""
        with self.lock:
            if self.rt is None or self.failed is not None:
                return
            target = self._wall_virtual()
            while self._clock_free() and self.eng.now < target:
                self._drive(target)
            self.last_sync_ns = self.eng.now

    def poke(self) -> None:
        """Real time: the driving thread looks again at when the next event is due."""
        with self.lock:
            if self.driver is not None:
                self._post(self.driver)

    # -- the engine (all under self.lock) ----------------------------------------------------

    def _post(self, w: _Waiter) -> None:
        if not w.posted:
            w.posted = True
            w.sem.release()

    def _grant(self, w: _Waiter) -> None:
        w.granted = True
        self.users.add(w.holder)
        self.inside.pop(w, None)
        if self.driver is w:
            self.driver = None
        self.progress = time.monotonic()
        self._post(w)

    def _advance(self) -> None:
        """Pass a free token on, or start the clock (rules 2, 3, 5).  In real time,
        every thread waiting for the token gets one at once."""
        if self.rt is None:
            if self.users:
                return
            if self.ready:
                self._grant(self.ready.popleft())
                return
        while self.ready:
            self._grant(self.ready.popleft())
        if self.starting:
            return
        if self.entries:
            for s in sorted(self.entries, key=lambda s: s.g):
                s.vcpu._started = True
                self.eng.start_vcpu(s.g)
            self.entries.clear()
        if self.inside and self.driver is None:
            # (Which thread drives changes nothing in the run.)
            self.driver = next((x for x in self.inside if x.blocked), None)
            if self.driver is not None:
                self._post(self.driver)

    def _enter(self, w: _Waiter) -> None:
        """``w`` waits inside (in run(), or for a time): it may drive the clock."""
        self.inside[w] = None
        self.next_due = min(self.next_due, _due(w))

    def _drive(self, limit: int | None = None) -> float:
        """One chunk of virtual time on the driving thread; then hand exits out.
        Returns how long (wall seconds) a real-time driver may sleep now, else 0."""
        eng = self.eng
        until = min(eng.now + self.chunk_ns, self.next_due)
        paced = False
        if self.rt is not None:
            wall = self._wall_virtual() if limit is None else limit
            if wall < until:
                until, paced = wall, True
        t0 = time.monotonic()
        r = eng.run_until_exit(max(until, eng.now), False)
        self.progress = t = time.monotonic()
        if r < 0:
            # A chunk that ran its length: the next is longer or shorter, so that
            # one lasts about CHUNK_WALL_S.
            if t - t0 < CHUNK_WALL_S / 2:
                self.chunk_ns = min(self.chunk_ns * 2, 1 << 62)
            elif t - t0 > CHUNK_WALL_S * 2:
                self.chunk_ns = max(self.chunk_ns // 2, 1000)
        host = self.host
        pending = eng.pending_exits()
        for g in sorted(pending):
            ex = eng.take_exit(g)
            host._vcpu_of(g)._held = ex
            s = self.slots.get(g)
            if s is not None and s.state == IN_RUN:
                self.ready.extend(self.mutex_waiters.pop(g, ()))
                s.state = READY
                del self.inside[s.waiter]
                self.ready.append(s.waiter)
        now = eng.now
        if now >= self.next_due:
            # (next_due is a lower bound: a scan only when it is reached.)
            for w in [w for w in self.inside if _due(w) <= now]:
                if w.kind == "time":
                    del self.inside[w]
                    self.ready.append(w)
                else:
                    self._watchdog(w.holder, now)
            self.next_due = min(map(_due, self.inside), default=(1 << 64) - 1)
        if not self._clock_free() or self.driver not in self.inside:
            self.driver = None
        self._advance()
        if not paced or r >= 0 or pending or self.driver is None:
            return 0.0
        # Real time, the wall clock reached: sleep until the next event is due.
        nxt = eng.next_event_ns
        nxt = min((1 << 64) - 1 if nxt is None else nxt, self.next_due)
        ahead = (nxt - eng.now) / self.rt[0] / 1e9
        return min(max(ahead, 1e-6), _POLL_S)

    def _watchdog(self, s: _Slot, now: int) -> None:
        """``VCpu.run``'s watchdog, for a vCPU whose thread waits in run()."""
        vcpu = s.vcpu
        if s.signalled_at is None:
            self.eng.signal(s.g)
            s.signalled_at = now
            if s.warn:
                s.warning = vcpu._watchdog_warning(s.timeout, now)
        elif now - s.signalled_at >= vcpu._signal_grace(s.timeout):
            w = s.waiter
            w.fail = KvmError(errno.ETIMEDOUT, vcpu._stuck_message(s.signalled_at))
            del self.inside[w]
            self.ready.append(w)
            s.state = READY
            return
        s.deadline = min(now + s.timeout, (1 << 64) - 1)

    # -- blocking ---------------------------------------------------------------------------

    def _block(self, w: _Waiter) -> None:
        """Sleep on ``w`` until it is granted the token; drive the clock when picked."""
        got = False
        try:
            while True:
                with self.lock:
                    if not w.blocked:
                        w.blocked = True
                        if self.driver is None and w in self.inside and self._clock_free():
                            self.driver = w
                    if got:
                        w.posted = False
                    if w.error is not None:
                        raise w.error
                    if w.granted:
                        return
                    timeout = _POLL_S
                    if self.driver is w:
                        if self._clock_free():
                            timeout = self._drive()
                            if not timeout:
                                got = False
                                continue
                        else:
                            self.driver = None
                            self._advance()
                    elif not got:
                        self._look_for_deadlock()
                        if w.error is not None:
                            raise w.error
                if timeout < RT_SPIN_S:
                    # Real time, the next event due within microseconds: an OS timer
                    # would wake the thread late; spin, yielding the GIL.
                    end = time.monotonic() + timeout
                    while time.monotonic() < end and not w.posted:
                        time.sleep(0)
                    got = w.sem.acquire(blocking=False)
                    continue
                got = w.sem.acquire(timeout=timeout)
        except BaseException as exc:
            with self.lock:
                if not isinstance(exc, DeadlockError) and not w.granted:
                    self._fail(f"a thread blocked in kvmwake stopped on {type(exc).__name__}: "
                               f"{exc}; the host's vCPU threads cannot go on")
                if self.driver is w:
                    self.driver = None
            raise

    def _look_for_deadlock(self) -> None:
        """Rule out a hang: an owner thread that died holding the clock, or a clock
        held with no progress for ``deadlock_timeout_s``."""
        stalled = time.monotonic() - self.progress
        if stalled < _POLL_S:
            return
        for s in self.slots.values():
            if s.owner is not None and not s.owner.is_alive() \
                    and s.state in (ACTIVE, STARTING):
                self._fail(f"{s.name()}'s thread {s.owner.name!r} ended without detaching "
                           "it, so it holds the clock for ever: detach (or park) a vCPU "
                           "its thread no longer runs")
                return
        if self._clock_free() or not self.deadlock_timeout_s:
            return
        if stalled < self.deadlock_timeout_s:
            return
        self._fail(self._deadlock_message(stalled))

    def _deadlock_message(self, stalled: float) -> str:
        if self.users:
            who = " and ".join(u.name() for u in self.users) + " has held the userspace token"
        else:
            who = ", ".join(s.name() for s in self.slots.values() if s.state == STARTING) \
                + " has not made its first run()"
        waiting = [s.name() for s in self.slots.values() if s.state in (IN_RUN, READY)]
        others = len(self.ready) + len(self.inside) - len(waiting)
        verb = " waits in KVM_RUN" if len(waiting) == 1 else " wait in KVM_RUN"
        return (f"deadlock: {who} for {stalled:.1f} s of wall time (virtual time stands at "
                f"{self.eng.now} ns) while "
                + (", ".join(waiting) + verb if waiting else "nobody is in KVM_RUN")
                + (f" and {others} other thread(s) wait for the clock" if others > 0 else "")
                + ": a thread that waits for another thread in userspace must park its vCPU "
                  "(VCpu.park), and a thread that stops running its vCPU must detach it")

    def _fail(self, message: str) -> None:
        """Every blocked thread raises DeadlockError(message); later calls too."""
        self.failed = message
        err = DeadlockError(message)
        for s in self.slots.values():
            if s.waiter is not None and not s.waiter.granted:
                s.waiter.error = err
                self._post(s.waiter)
        for w in list(self.ready) + list(self.inside) + [
                w for ws in self.mutex_waiters.values() for w in ws]:
            w.error = err
            self._post(w)
