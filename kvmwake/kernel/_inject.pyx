"""The timing-critical part of a kernel recording: native threads, no GIL.

One C thread per vCPU runs the ``KVM_RUN`` loop (pinned to its host CPU) and
timestamps each wake port exit with ``CLOCK_MONOTONIC``; one C injector
thread (pinned too) sleeps with ``clock_nanosleep(TIMER_ABSTIME)`` to each
target time of the schedule and sends that wake's MSI with
``KVM_SIGNAL_MSI``, timestamping just before and just after the ioctl.
Python only starts them, waits (so Ctrl-C is seen at once), and stops them.
All signals are blocked in these threads except a private real-time "kick"
signal with an empty handler, used to break a thread out of ``KVM_RUN`` or
``clock_nanosleep`` if the stop MSI does not reach it.

Also: micro-benchmarks of the harness itself (clock read, one
``KVM_SIGNAL_MSI`` that delivers nothing, the injector's timer lateness).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport calloc, free

import numpy as np

cdef extern from *:
    """
    #include <pthread.h>
    #include <sched.h>
    #include <time.h>
    #include <errno.h>
    #include <signal.h>
    #include <string.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <stdio.h>
    #include <unistd.h>
    #include <sys/ioctl.h>
    #include <sys/prctl.h>
    #include <sys/syscall.h>

    #define KW_EXIT_IO 2
    #define KW_EXIT_INTR 10
    #define KW_EXIT_INTERNAL_ERROR 17

    typedef struct {
        uint32_t address_lo, address_hi, data, flags, devid;
        uint8_t pad[12];
    } kw_msi_t;

    struct kw_session;

    typedef struct {
        struct kw_session* s;
        int idx;
        int fd;
        volatile uint8_t* run;
        int cpu;
        pthread_t th;
        int started;
        int joined;
        volatile int ready;
        volatile int done;
        volatile int tid;
        volatile int64_t exits;
        volatile int64_t wakes_seen;
        volatile int64_t intr_exits;
        volatile int64_t stray;
        volatile int64_t dup;
        int64_t user_ns;           /* time spent in userspace between KVM_RUN calls */
        int64_t user_max_ns;
        int error;                 /* 0, or KW_VERR_* */
        int err_errno;
        uint32_t err_reason;
        uint32_t err_sub;
        uint32_t err_data;
        const int64_t* kidx;       /* global wake indices of this vCPU, in order */
        int64_t nk;
        int64_t* vec_count;        /* per wake vector: port exits seen */
        const int64_t* sidx;       /* IPI guest: global indices of the wakes it sends, in order */
        int64_t nsend;
        volatile int64_t send_count;
    } kw_vcpu_t;

    enum { KW_VERR_NONE = 0, KW_VERR_RUN = 1, KW_VERR_EXIT = 2, KW_VERR_FAULT = 3,
           KW_VERR_INTERNAL = 4 };

    typedef struct kw_session {
        unsigned long run_req;
        unsigned long msi_req;
        int vm_fd;
        int nvcpu;
        kw_vcpu_t* v;
        int inj_cpu;
        int mode;                  /* 0 sleep, 1 spin, 2 sleep then spin the last spin_ns */
        int64_t spin_ns;
        int64_t n;
        int64_t nmsi;              /* the injector sends wakes 0 .. nmsi-1 (the rest: IPIs) */
        const int64_t* target;     /* ns after t0 */
        const int32_t* tgt;        /* vCPU (= APIC ID) */
        const int32_t* vector;
        int64_t* sent;             /* CLOCK_MONOTONIC just before the ioctl */
        int64_t* sent_end;         /* ... just after */
        int32_t* ret;              /* ioctl result, or -errno */
        int64_t* seen;             /* port exit seen by the vCPU thread (0: never) */
        int vec_base;
        int nvec;
        int wake_port;
        int ready_port;
        int fault_port;
        int stop_vector;
        int send_port;             /* IPI guest: about to send its IPI */
        int done_port;             /* IPI guest: the plan's last wake arrived */
        volatile int chain_done;
        volatile int stop;
        volatile int inj_done;
        volatile int64_t inj_sent;
        volatile int inj_tid;
        int64_t t0;
        int64_t start_delay_ns;
        pthread_t inj_th;
        int inj_started;
        int inj_joined;
        int kick_sig;
        int sig_installed;
        struct sigaction old_sa;
    } kw_session_t;

    static inline int64_t kw_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static void kw_kick_handler(int sig) { (void)sig; }

    static void kw_pin(int cpu) {
        if (cpu < 0) return;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }

    static void kw_unblock_kick(int sig) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    }

    static void kw_receipt(kw_vcpu_t* v, uint32_t vec, int64_t t) {
        kw_session_t* s = v->s;
        int vi = (int)vec - s->vec_base;
        if (vi < 0 || vi >= s->nvec) { v->stray++; return; }
        int64_t j = vi + (int64_t)s->nvec * v->vec_count[vi];
        v->vec_count[vi]++;
        if (j >= v->nk) { v->stray++; return; }
        int64_t k = v->kidx[j];
        if (s->seen[k]) { v->dup++; return; }
        s->seen[k] = t;
        v->wakes_seen++;
    }

    static void kw_send(kw_vcpu_t* v, int64_t t) {
        kw_session_t* s = v->s;
        int64_t j = v->send_count++;
        if (j >= v->nsend) { v->stray++; return; }
        int64_t k = v->sidx[j];
        s->sent[k] = t;
        s->sent_end[k] = t;
        s->ret[k] = 1;
    }

    static void* kw_vcpu_main(void* arg) {
        kw_vcpu_t* v = (kw_vcpu_t*)arg;
        kw_session_t* s = v->s;
        char name[16];
        kw_pin(v->cpu);
        v->tid = (int)syscall(SYS_gettid);
        snprintf(name, sizeof name, "CPU %d/KVM", v->idx);
        pthread_setname_np(pthread_self(), name);
        kw_unblock_kick(s->kick_sig);
        volatile uint8_t* run = v->run;
        int64_t back = 0;
        for (;;) {
            if (back) {
                int64_t u = kw_now() - back;
                v->user_ns += u;
                if (u > v->user_max_ns) v->user_max_ns = u;
            }
            int rc = ioctl(v->fd, s->run_req, 0);
            int64_t t = kw_now();
            back = t;
            if (rc < 0) {
                int e = errno;
                if (e == EINTR || e == EAGAIN) {
                    v->intr_exits++;
                    if (s->stop) break;
                    continue;
                }
                v->error = KW_VERR_RUN; v->err_errno = e;
                break;
            }
            v->exits++;
            uint32_t reason = *(volatile uint32_t*)(run + 8);
            if (reason == KW_EXIT_IO) {
                uint16_t port = *(volatile uint16_t*)(run + 34);
                uint64_t off = *(volatile uint64_t*)(run + 40);
                uint8_t data = *(volatile uint8_t*)(run + off);
                if (port == s->wake_port) {
                    if (data != s->stop_vector) kw_receipt(v, data, t);
                } else if (port == s->ready_port) {
                    v->ready = 1;
                } else if (s->send_port > 0 && port == s->send_port) {
                    kw_send(v, t);
                } else if (s->done_port > 0 && port == s->done_port) {
                    __atomic_store_n(&s->chain_done, 1, __ATOMIC_RELEASE);
                } else {
                    v->error = (port == s->fault_port) ? KW_VERR_FAULT : KW_VERR_EXIT;
                    v->err_reason = reason; v->err_data = data | ((uint32_t)port << 8);
                    break;
                }
                if (s->stop) break;
            } else if (reason == KW_EXIT_INTR) {
                v->intr_exits++;
                if (s->stop) break;
            } else {
                v->error = reason == KW_EXIT_INTERNAL_ERROR ? KW_VERR_INTERNAL : KW_VERR_EXIT;
                v->err_reason = reason;
                v->err_sub = *(volatile uint32_t*)(run + 32);
                break;
            }
        }
        __atomic_store_n(&v->done, 1, __ATOMIC_RELEASE);
        return NULL;
    }

    static void kw_sleep_until(kw_session_t* s, int64_t target) {
        struct timespec ts;
        int64_t wake = target;
        /* Already late: no sleep at all (clock_nanosleep with a past deadline can still
           schedule and cost a whole timer wake-up). */
        if (kw_now() >= target) return;
        if (s->mode == 1) {
            while (!s->stop && kw_now() < target) { }
            return;
        }
        if (s->mode == 2) {
            wake = target - s->spin_ns;
            if (kw_now() >= wake) goto spin;
        }
        ts.tv_sec = wake / 1000000000LL;
        ts.tv_nsec = wake % 1000000000LL;
        while (!s->stop) {
            int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            if (rc == 0) break;
            if (rc != EINTR) break;
        }
        if (s->mode != 2) return;
    spin:
        while (!s->stop && kw_now() < target) { }
    }

    static void* kw_inj_main(void* arg) {
        kw_session_t* s = (kw_session_t*)arg;
        kw_pin(s->inj_cpu);
        s->inj_tid = (int)syscall(SYS_gettid);
        pthread_setname_np(pthread_self(), "kvmwake-inject");
        prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
        kw_unblock_kick(s->kick_sig);
        kw_msi_t msi;
        s->t0 = kw_now() + s->start_delay_ns;
        for (int64_t k = 0; k < s->nmsi; k++) {
            kw_sleep_until(s, s->t0 + s->target[k]);
            if (s->stop) break;
            memset(&msi, 0, sizeof msi);
            msi.address_lo = 0xFEE00000u | ((uint32_t)s->tgt[k] << 12);
            msi.data = (uint32_t)s->vector[k];
            int64_t a = kw_now();
            int rc = ioctl(s->vm_fd, s->msi_req, &msi);
            int64_t b = kw_now();
            s->sent[k] = a;
            s->sent_end[k] = b;
            s->ret[k] = rc < 0 ? -errno : rc;
            s->inj_sent = k + 1;
        }
        __atomic_store_n(&s->inj_done, 1, __ATOMIC_RELEASE);
        return NULL;
    }

    static int kw_spawn(pthread_t* th, void* (*fn)(void*), void* arg) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int rc = pthread_create(th, NULL, fn, arg);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return rc;
    }

    static int kw_install_kick(kw_session_t* s) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kw_kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;                   /* no SA_RESTART: ioctl returns EINTR */
        s->kick_sig = SIGRTMIN + 5;
        if (sigaction(s->kick_sig, &sa, &s->old_sa) != 0) return -errno;
        s->sig_installed = 1;
        return 0;
    }

    static void kw_uninstall_kick(kw_session_t* s) {
        if (s->sig_installed) {
            sigaction(s->kick_sig, &s->old_sa, NULL);
            s->sig_installed = 0;
        }
    }

    static int kw_start_vcpus(kw_session_t* s) {
        for (int i = 0; i < s->nvcpu; i++) {
            kw_vcpu_t* v = &s->v[i];
            int rc = kw_spawn(&v->th, kw_vcpu_main, v);
            if (rc) return -rc;
            v->started = 1;
        }
        return 0;
    }

    static int kw_start_injector(kw_session_t* s) {
        int rc = kw_spawn(&s->inj_th, kw_inj_main, s);
        if (rc) return -rc;
        s->inj_started = 1;
        return 0;
    }

    static int kw_timed_join(pthread_t th, volatile int* done, int64_t deadline) {
        while (!__atomic_load_n(done, __ATOMIC_ACQUIRE)) {
            if (kw_now() > deadline) return -1;
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
        pthread_join(th, NULL);
        return 0;
    }

    /* Stop everything; returns the number of threads that could not be joined. */
    static int kw_stop(kw_session_t* s, int64_t timeout_ns) {
        int stuck = 0;
        s->stop = 1;
        __sync_synchronize();
        int64_t deadline = kw_now() + timeout_ns;
        if (s->inj_started && !s->inj_joined) {
            if (!__atomic_load_n(&s->inj_done, __ATOMIC_ACQUIRE))
                pthread_kill(s->inj_th, s->kick_sig);
            if (kw_timed_join(s->inj_th, &s->inj_done, deadline) == 0) s->inj_joined = 1;
            else stuck++;
        }
        kw_msi_t msi;
        for (int i = 0; i < s->nvcpu; i++) {
            kw_vcpu_t* v = &s->v[i];
            if (!v->started || v->joined) continue;
            *(volatile uint8_t*)(v->run + 1) = 1;          /* immediate_exit */
            memset(&msi, 0, sizeof msi);
            msi.address_lo = 0xFEE00000u | ((uint32_t)v->idx << 12);
            msi.data = (uint32_t)s->stop_vector;
            ioctl(s->vm_fd, s->msi_req, &msi);
        }
        for (int round = 0; round < 2; round++) {
            int64_t dl = kw_now() + (round == 0 ? timeout_ns / 2 : timeout_ns / 2);
            for (int i = 0; i < s->nvcpu; i++) {
                kw_vcpu_t* v = &s->v[i];
                if (!v->started || v->joined) continue;
                if (round == 1 && !__atomic_load_n(&v->done, __ATOMIC_ACQUIRE))
                    pthread_kill(v->th, s->kick_sig);
                if (kw_timed_join(v->th, &v->done, dl) == 0) v->joined = 1;
            }
            int left = 0;
            for (int i = 0; i < s->nvcpu; i++)
                if (s->v[i].started && !s->v[i].joined) left++;
            if (!left) break;
            if (round == 0) {
                for (int i = 0; i < s->nvcpu; i++) {
                    kw_vcpu_t* v = &s->v[i];
                    if (v->started && !v->joined) pthread_kill(v->th, s->kick_sig);
                }
            }
        }
        for (int i = 0; i < s->nvcpu; i++)
            if (s->v[i].started && !s->v[i].joined) stuck++;
        return stuck;
    }

    static int kw_v_ready(kw_session_t* s, int i) { return __atomic_load_n(&s->v[i].ready, __ATOMIC_ACQUIRE); }
    static int kw_v_done(kw_session_t* s, int i) { return __atomic_load_n(&s->v[i].done, __ATOMIC_ACQUIRE); }
    static int64_t kw_v_seen(kw_session_t* s, int i) { return __atomic_load_n(&s->v[i].wakes_seen, __ATOMIC_ACQUIRE); }
    static int kw_inj_is_done(kw_session_t* s) { return __atomic_load_n(&s->inj_done, __ATOMIC_ACQUIRE); }
    static int kw_chain_is_done(kw_session_t* s) { return __atomic_load_n(&s->chain_done, __ATOMIC_ACQUIRE); }

    static int64_t kw_inj_count(kw_session_t* s) { return __atomic_load_n(&s->inj_sent, __ATOMIC_ACQUIRE); }

    static void kw_bench_clock(int64_t* out, int64_t n) {
        for (int64_t i = 0; i < n; i++) {
            int64_t a = kw_now();
            int64_t b = kw_now();
            out[i] = b - a;
        }
    }

    static void kw_bench_msi(int vm_fd, unsigned long req, uint32_t apic_id, uint32_t vector,
                             int64_t* out, int32_t* ret, int64_t n) {
        kw_msi_t msi;
        for (int64_t i = 0; i < n; i++) {
            memset(&msi, 0, sizeof msi);
            msi.address_lo = 0xFEE00000u | (apic_id << 12);
            msi.data = vector;
            int64_t a = kw_now();
            int rc = ioctl(vm_fd, req, &msi);
            int64_t b = kw_now();
            out[i] = b - a;
            ret[i] = rc < 0 ? -errno : rc;
        }
    }

    static void kw_bench_timer(int cpu, int64_t period_ns, int64_t* late, int64_t n) {
        cpu_set_t old;
        int pinned = 0;
        if (cpu >= 0 && pthread_getaffinity_np(pthread_self(), sizeof old, &old) == 0) {
            kw_pin(cpu);
            pinned = 1;
        }
        unsigned long slack = (unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
        prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
        int64_t t = kw_now() + period_ns;
        for (int64_t i = 0; i < n; i++) {
            struct timespec ts = {t / 1000000000LL, t % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) { }
            late[i] = kw_now() - t;
            t += period_ns;
        }
        prctl(PR_SET_TIMERSLACK, slack, 0, 0, 0);
        if (pinned) pthread_setaffinity_np(pthread_self(), sizeof old, &old);
    }
    """
    ctypedef struct kw_vcpu_t:
        void* s
        int idx
        int fd
        uint8_t* run
        int cpu
        int started
        int joined
        int ready
        int done
        int tid
        int64_t exits
        int64_t wakes_seen
        int64_t intr_exits
        int64_t stray
        int64_t dup
        int64_t user_ns
        int64_t user_max_ns
        int error
        int err_errno
        uint32_t err_reason
        uint32_t err_sub
        uint32_t err_data
        const int64_t* kidx
        int64_t nk
        int64_t* vec_count
        const int64_t* sidx
        int64_t nsend
        int64_t send_count

    ctypedef struct kw_session_t:
        unsigned long run_req
        unsigned long msi_req
        int vm_fd
        int nvcpu
        kw_vcpu_t* v
        int inj_cpu
        int mode
        int64_t spin_ns
        int64_t n
        int64_t nmsi
        const int64_t* target
        const int32_t* tgt
        const int32_t* vector
        int64_t* sent
        int64_t* sent_end
        int32_t* ret
        int64_t* seen
        int vec_base
        int nvec
        int wake_port
        int ready_port
        int fault_port
        int stop_vector
        int send_port
        int done_port
        int chain_done
        int stop
        int inj_done
        int64_t inj_sent
        int inj_tid
        int64_t t0
        int64_t start_delay_ns
        int inj_started
        int inj_joined
        int kick_sig

    int64_t kw_now() nogil
    int kw_v_ready(kw_session_t* s, int i) nogil
    int kw_v_done(kw_session_t* s, int i) nogil
    int64_t kw_v_seen(kw_session_t* s, int i) nogil
    int kw_inj_is_done(kw_session_t* s) nogil
    int kw_chain_is_done(kw_session_t* s) nogil
    int64_t kw_inj_count(kw_session_t* s) nogil
    int kw_install_kick(kw_session_t* s) nogil
    void kw_uninstall_kick(kw_session_t* s) nogil
    int kw_start_vcpus(kw_session_t* s) nogil
    int kw_start_injector(kw_session_t* s) nogil
    int kw_stop(kw_session_t* s, int64_t timeout_ns) nogil
    void kw_bench_clock(int64_t* out, int64_t n) nogil
    void kw_bench_msi(int vm_fd, unsigned long req, uint32_t apic_id, uint32_t vector,
                      int64_t* out, int32_t* ret, int64_t n) nogil
    void kw_bench_timer(int cpu, int64_t period_ns, int64_t* late, int64_t n) nogil


#: What ``vcpu_status()["error"]`` means.
VCPU_ERRORS = {0: None, 1: "KVM_RUN failed", 2: "unexpected exit", 3: "guest exception",
               4: "KVM_EXIT_INTERNAL_ERROR"}
MODES = {"sleep": 0, "spin": 1, "hybrid": 2}


def now_ns():
    """``CLOCK_MONOTONIC`` in ns, read the way the threads read it."""
    return kw_now()


cdef class Session:
    """vCPU threads and the injector of one recording.

    The schedule arrays (``targets`` ns after the injector's start, ``vcpus``,
    ``vectors``) and the per-vCPU kvm_run addresses come from Python; the
    result arrays (``sent``, ``sent_end``, ``ret``, ``seen``) are filled in
    place by the threads and read after ``stop()``.
    """

    cdef kw_session_t s
    cdef kw_vcpu_t* v
    cdef int _stopped
    cdef readonly object targets, vcpus, vectors, sent, sent_end, ret, seen
    cdef object _kidx, _veccount, _keep, _sidx

    def __cinit__(self):
        self.v = NULL
        self._stopped = 1

    def __init__(self, int vm_fd, vcpu_fds, run_addrs, cpus, int inj_cpu,
                 unsigned long run_req, unsigned long msi_req, targets, vcpus, vectors, *,
                 int vec_base, int nvec, int wake_port, int ready_port, int fault_port,
                 int stop_vector, str mode="sleep", int64_t spin_ns=0,
                 int64_t start_delay_ns=2_000_000, msi_count=None, senders=None,
                 int send_port=0, int done_port=0):
        cdef int nv = len(vcpu_fds), i
        if nv < 1 or len(run_addrs) != nv or len(cpus) != nv:
            raise ValueError("vcpu_fds, run_addrs and cpus must have one entry per vCPU")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.targets = np.ascontiguousarray(targets, dtype=np.int64)
        self.vcpus = np.ascontiguousarray(vcpus, dtype=np.int32)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.int32)
        n = len(self.targets)
        if len(self.vcpus) != n or len(self.vectors) != n:
            raise ValueError("targets, vcpus and vectors must have the same length")
        if n and (self.vcpus.min() < 0 or self.vcpus.max() >= nv):
            raise ValueError("a wake targets a vCPU that does not exist")
        nmsi = n if msi_count is None else int(msi_count)
        if not 0 <= nmsi <= n:
            raise ValueError("msi_count must be in 0..len(targets)")
        if nmsi and np.any(np.diff(self.targets[:nmsi]) < 0):
            raise ValueError("targets must be non-decreasing")
        snd = (np.full(n, -1, dtype=np.int32) if senders is None
               else np.ascontiguousarray(senders, dtype=np.int32))
        if len(snd) != n or (n and (snd.min() < -1 or snd.max() >= nv)):
            raise ValueError("senders must give, per wake, -1 (the injector) or a vCPU")
        self.sent = np.zeros(n, dtype=np.int64)
        self.sent_end = np.zeros(n, dtype=np.int64)
        self.ret = np.zeros(n, dtype=np.int32)
        self.seen = np.zeros(n, dtype=np.int64)
        self._kidx = [np.ascontiguousarray(np.nonzero(self.vcpus == i)[0], dtype=np.int64)
                      for i in range(nv)]
        self._veccount = [np.zeros(nvec, dtype=np.int64) for i in range(nv)]
        self._sidx = [np.ascontiguousarray(np.nonzero(snd == i)[0], dtype=np.int64)
                      for i in range(nv)]
        self.v = <kw_vcpu_t*>calloc(nv, sizeof(kw_vcpu_t))
        if self.v == NULL:
            raise MemoryError()
        cdef int64_t[::1] tv = self.targets, sv = self.sent, sev = self.sent_end, \
            seenv = self.seen, kv, cv, sxv
        cdef int32_t[::1] vv = self.vcpus, vecv = self.vectors, rv = self.ret
        for i in range(nv):
            kv = self._kidx[i]
            cv = self._veccount[i]
            self.v[i].s = &self.s
            self.v[i].idx = i
            self.v[i].fd = vcpu_fds[i]
            self.v[i].run = <uint8_t*><size_t>run_addrs[i]
            self.v[i].cpu = cpus[i]
            self.v[i].kidx = &kv[0] if kv.shape[0] else NULL
            self.v[i].nk = kv.shape[0]
            self.v[i].vec_count = &cv[0]
            sxv = self._sidx[i]
            self.v[i].sidx = &sxv[0] if sxv.shape[0] else NULL
            self.v[i].nsend = sxv.shape[0]
        self.s.run_req = run_req
        self.s.msi_req = msi_req
        self.s.vm_fd = vm_fd
        self.s.nvcpu = nv
        self.s.v = self.v
        self.s.inj_cpu = inj_cpu
        self.s.mode = MODES[mode]
        self.s.spin_ns = spin_ns
        self.s.n = n
        self.s.nmsi = nmsi
        self.s.send_port = send_port
        self.s.done_port = done_port
        self.s.target = &tv[0] if n else NULL
        self.s.tgt = &vv[0] if n else NULL
        self.s.vector = &vecv[0] if n else NULL
        self.s.sent = &sv[0] if n else NULL
        self.s.sent_end = &sev[0] if n else NULL
        self.s.ret = &rv[0] if n else NULL
        self.s.seen = &seenv[0] if n else NULL
        self.s.vec_base = vec_base
        self.s.nvec = nvec
        self.s.wake_port = wake_port
        self.s.ready_port = ready_port
        self.s.fault_port = fault_port
        self.s.stop_vector = stop_vector
        self.s.start_delay_ns = start_delay_ns
        self._keep = (vcpu_fds, run_addrs)
        rc = kw_install_kick(&self.s)
        if rc < 0:
            raise OSError(-rc, "sigaction for the kick signal failed")
        self._stopped = 0

    def start_vcpus(self):
        """Start one thread per vCPU (each runs KVM_RUN until stopped)."""
        cdef int rc
        with nogil:
            rc = kw_start_vcpus(&self.s)
        if rc < 0:
            raise OSError(-rc, "pthread_create failed for a vCPU thread")

    def start_injector(self):
        """Start the injector: its clock starts ``start_delay_ns`` from now."""
        cdef int rc
        with nogil:
            rc = kw_start_injector(&self.s)
        if rc < 0:
            raise OSError(-rc, "pthread_create failed for the injector")

    def all_ready(self) -> bool:
        cdef int i
        for i in range(self.s.nvcpu):
            if not kw_v_ready(&self.s, i):
                return False
        return True

    def any_vcpu_failed(self) -> bool:
        cdef int i
        for i in range(self.s.nvcpu):
            if kw_v_done(&self.s, i):
                return True
        return False

    @property
    def injector_done(self) -> bool:
        return bool(kw_inj_is_done(&self.s))

    @property
    def chain_done(self) -> bool:
        """IPI guest: the vCPU woken by the plan's last wake reported it."""
        return bool(kw_chain_is_done(&self.s))

    @property
    def injector_sent(self) -> int:
        return kw_inj_count(&self.s)

    @property
    def t0(self) -> int:
        """The injector's time zero (CLOCK_MONOTONIC ns); targets are relative to it."""
        return self.s.t0

    @property
    def injector_tid(self) -> int:
        return self.s.inj_tid

    def received(self) -> int:
        cdef int i
        cdef int64_t n = 0
        for i in range(self.s.nvcpu):
            n += kw_v_seen(&self.s, i)
        return n

    def stop(self, double timeout_s=2.0) -> int:
        """Stop the injector and the vCPU threads (stop MSI, immediate_exit, then the kick
        signal); returns how many threads could not be joined (0 normally)."""
        cdef int stuck
        cdef int64_t t = <int64_t>(timeout_s * 1e9)
        if self._stopped:
            return 0
        with nogil:
            stuck = kw_stop(&self.s, t)
        if stuck == 0:
            kw_uninstall_kick(&self.s)
        self._stopped = 1
        return stuck

    def vcpu_status(self) -> list:
        out = []
        cdef int i
        cdef kw_vcpu_t* v
        for i in range(self.s.nvcpu):
            v = &self.v[i]
            out.append({
                "vcpu": i, "tid": v.tid, "cpu": v.cpu, "ready": bool(v.ready),
                "done": bool(v.done), "exits": v.exits, "wakes_seen": v.wakes_seen,
                "intr_exits": v.intr_exits, "stray": v.stray, "dup": v.dup,
                "user_ns": v.user_ns, "user_max_ns": v.user_max_ns,
                "error": VCPU_ERRORS.get(v.error, v.error), "errno": v.err_errno,
                "exit_reason": v.err_reason, "suberror": v.err_sub,
                "fault": v.err_data if v.error else 0,
            })
        return out

    def __dealloc__(self):
        if not self._stopped:
            with nogil:
                kw_stop(&self.s, 2_000_000_000)
            kw_uninstall_kick(&self.s)
        if self.v != NULL:
            free(self.v)
            self.v = NULL


def bench_clock(int64_t n=10000):
    """Cost of one CLOCK_MONOTONIC read pair, ns (array of n)."""
    out = np.zeros(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    with nogil:
        kw_bench_clock(&o[0], n)
    return out


def bench_msi(int vm_fd, unsigned long msi_req, uint32_t apic_id, uint32_t vector,
              int64_t n=1000):
    """Durations (ns) and results of n KVM_SIGNAL_MSI ioctls to ``apic_id``."""
    out = np.zeros(n, dtype=np.int64)
    ret = np.zeros(n, dtype=np.int32)
    cdef int64_t[::1] o = out
    cdef int32_t[::1] r = ret
    with nogil:
        kw_bench_msi(vm_fd, msi_req, apic_id, vector, &o[0], &r[0], n)
    return out, ret


def bench_timer(int cpu, int64_t period_ns, int64_t n=200):
    """Lateness (ns) of n absolute clock_nanosleep wake-ups every period_ns, pinned to cpu."""
    out = np.zeros(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    with nogil:
        kw_bench_timer(cpu, period_ns, &o[0], n)
    return out
