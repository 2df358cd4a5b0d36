# The core's C state.  Every struct is laid out largest field first so that a
# numpy structured dtype with align=True has the same layout (see
# kvmwake/_layout.py and tests/test_core_mirrors.py).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t


cdef extern from *:
    """
    #define KW_MAX_LOOP_DEPTH 4
    """
    enum: KW_MAX_LOOP_DEPTH


# One thread of the host: a vCPU thread and the kvm_vcpu fields the model
# needs, or (kind THREAD_HOST) a host thread that is not a vCPU, which uses the
# scheduler's fields, the program's (prog, pc, loops), the segment's, its random
# stream, wake_ts (runnable since), run_start and halt_start (asleep since).
ctypedef struct thread_t:
    uint64_t seg_end          # end of the current timed segment
    uint64_t seg_gfrom        # guest mode starts (after the entry part)
    uint64_t seg_gto          # guest mode ends (before the exit part)
    uint64_t rem_end          # preempted: what was left of the segment
    uint64_t rem_gfrom
    uint64_t rem_gto
    uint64_t run_start        # got its host CPU at
    uint64_t halt_start       # kvm_vcpu_halt: start
    uint64_t poll_end         # kvm_vcpu_halt: poll_end
    uint64_t wake_ts          # last effective wake-up
    uint64_t rng_state
    uint64_t rng_inc
    uint64_t cost_rng_state   # its cost stream (kvmwake.costs: drawn costs only)
    uint64_t cost_rng_inc
    uint64_t stall_t
    # EEVDF (kernel/sched/fair.c, struct sched_entity; nice 0, so weights cancel).
    int64_t vruntime          # se->vruntime
    int64_t deadline          # se->deadline (virtual)
    int64_t vlag              # se->vlag, meaningful while not on its run queue
    int64_t vprot             # se->vprot (RUN_TO_PARITY), meaningful while current
    uint64_t exec_start       # se->exec_start
    uint64_t nr_migrations    # se->nr_migrations (set_task_cpu onto another CPU)
    uint64_t regs[31]         # x0..x30 (struct user_pt_regs.regs)
    uint64_t sp               # SP_EL0 (user_pt_regs.sp)
    uint64_t pstate           # PSTATE but its I bit, which is virq_t.masked
    uint64_t pc_raw           # the PC when it points at no op of the program
    uint64_t reset_pc         # KVM_REQ_VCPU_RESET's reset state (PSCI CPU_ON)
    uint64_t reset_r0
    uint64_t exit_data0       # the last exit to userspace
    uint64_t exit_value
    uint64_t exit_time        # (a host thread: its sleep_until deadline)
    uint64_t requests         # vcpu->requests (u64: request bits 0..63)
    uint32_t exit_reason
    uint32_t exit_type
    uint32_t exit_ndata
    uint32_t exit_ucall
    uint32_t gen              # generation of its pending SEGMENT/POLL_END/RUN event
    uint32_t run_gen          # generation of its time slice
    uint32_t halt_poll_ns     # vcpu->halt_poll_ns (unsigned int)
    uint32_t prog             # offset of its program in the op table
    uint32_t pc
    uint32_t vm
    uint32_t vcpu_id
    uint32_t pcpu
    uint32_t prog_n           # its program's length in ops
    int32_t rq_next           # next thread in its host CPU's run queue, or -1
    uint32_t stall_n
    uint32_t aff_off          # AFF_LIST: word offset of its CPU mask in engine_t.affmask
    uint32_t loops[KW_MAX_LOOP_DEPTH]
    uint8_t state
    uint8_t resume
    uint8_t cont
    uint8_t slice_armed
    uint8_t do_poll
    uint8_t has_prog
    uint8_t mp_state          # KVM_MP_STATE_*
    uint8_t pc_valid
    uint8_t sig_pending
    uint8_t reset_pending
    uint8_t halt_kind         # HALT_*
    uint8_t on_rq             # EEVDF: se->on_rq (current, waiting, or delayed)
    uint8_t sched_delayed     # EEVDF: se->sched_delayed (DELAY_DEQUEUE)
    uint8_t aff_kind          # p->cpus_ptr: AFF_PINNED (g % ncpu), AFF_ALL, AFF_LIST
    uint8_t kind              # THREAD_VCPU, or THREAD_HOST (core/hostthread.pxi)
    uint8_t _pad[3]
    # A lazy poll window (core/halt.pxi, poll_settle): its end, and the sequence
    # number its POLL_END event would have had (0: none; the poll end is queued).
    uint64_t poll_stop
    uint64_t poll_seq


ctypedef struct vm_t:
    uint64_t tick_ns
    uint32_t first
    uint32_t nr_vcpus
    uint32_t max_halt_poll_ns
    uint32_t tick_gen
    uint32_t override
    uint32_t nr_spis
    uint64_t code_base        # op i of a program is at code_base + 4 * i
    uint32_t psci_version     # kvm->arch.psci_version (0: never written, KVM_ARM_PSCI_LATEST)
    uint32_t suspend_cap      # KVM_CAP_ARM_SYSTEM_SUSPEND enabled
    uint32_t vcpu_features    # kvm->arch.vcpu_features (KVM_ARM_VCPU_* bits, not POWER_OFF)
    uint32_t features_set     # KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED


# A VM's distributor (vGICv3 subset): SPI state in 16 words of 64 INTIDs;
# the private words' low 32 bits are unused here (they live in virq_t).
ctypedef struct gic_t:
    uint64_t spi_en[16]
    uint64_t spi_act[16]
    uint64_t spi_latch[16]
    uint64_t spi_line[16]
    uint64_t spi_level[16]
    int32_t spi_target[1024]      # vCPU id in the VM, or -1: never delivered
    uint32_t spi_mpidr[1024]
    uint8_t spi_prio[1024]
    uint32_t enabled
    uint32_t _pad


# One vCPU's interrupt state: redistributor + CPU interface (arm64), or the
# LAPIC's IRR/ISR/TPR (x86), the virtual timer, and the handler bookkeeping.
ctypedef struct virq_t:
    uint64_t ap[16]               # pending INTIDs queued on this vCPU (its ap_list)
    uint64_t irr[4]
    uint64_t isr[4]
    uint64_t timer_cval
    uint64_t handler_ns
    uint64_t sv_guest             # guest time left in the interrupted segment
    uint32_t priv_en
    uint32_t priv_act
    uint32_t priv_latch
    uint32_t priv_line
    uint32_t priv_level
    uint32_t timer_gen
    uint32_t timer_period
    int32_t cur_irq
    uint8_t priv_prio[32]
    uint8_t pmr
    uint8_t masked
    uint8_t timer_ctl
    uint8_t sv_cont
    uint8_t sv_valid
    uint8_t tpr
    uint8_t handler_noiret        # set_handler(iret=False): the handler ends masked
    uint8_t _pad[1]


ctypedef struct source_t:
    uint64_t p0
    uint64_t p1
    uint64_t rng_state
    uint64_t rng_inc
    uint64_t times_off            # TRACE: first time in the engine's time table
    uint64_t times_len
    uint64_t idx
    uint32_t vm
    uint32_t intid                # arm64: the SPI; x86: the MSI vector
    uint32_t kind
    uint32_t gen
    uint32_t target               # x86: the thread of the destination APIC ID
    uint32_t _pad


ctypedef struct cpu_t:
    # EEVDF (struct cfs_rq): sum_v = sum of (v - zero_v) over the queued entities,
    # the current one included (all nice 0); zero_v is the offset (zero_vruntime).
    int64_t zero_v
    int64_t sum_v
    int32_t cur               # the thread that has the CPU (or is switching in), or -1
    int32_t rq_head           # the waiting threads (EEVDF: the tree, delayed included)
    int32_t rq_tail
    uint32_t rq_len
    uint8_t need_resched      # EEVDF: TIF_NEED_RESCHED set while the current switches in
    uint8_t _pad[7]


ctypedef struct event_t:
    uint64_t t
    uint64_t key              # (event class << 56) | sequence number
    uint32_t who
    uint32_t gen


# The event queue (core/queue.pxi): a radix heap over event times, 64 buckets
# (6 bits) per level.
cdef extern from *:
    """
    #define KW_QLEVELS 10
    #define KW_QBUCKETS 640
    """
    enum: KW_QLEVELS
    enum: KW_QBUCKETS


ctypedef struct evq_bucket_t:
    event_t* ev
    uint64_t n
    uint64_t cap
    uint64_t tmin             # earliest time in the bucket (all ones when empty)


ctypedef struct evq_t:
    evq_bucket_t b0           # the events in the base's window: a binary heap
    evq_bucket_t b[640]       # KW_QBUCKETS: level L, digit d at L * 64 + d; unordered
    uint64_t dmask[10]        # KW_QLEVELS: bit d of dmask[L] set while bucket (L, d) holds events
    uint64_t lmask            # bit L set while dmask[L] is not 0
    uint64_t base             # the radix base: at or below every queued time
    uint64_t len              # events queued, void ones included
    uint64_t dropped          # void events dropped unpopped


ctypedef struct op_t:
    uint16_t code
    uint16_t dist
    uint32_t arg
    uint64_t p0
    uint64_t p1


ctypedef struct trace_rec_t:
    uint64_t ts
    uint64_t a
    uint32_t pid
    uint32_t cpu
    uint32_t vcpu_id
    uint32_t b
    uint8_t kind
    uint8_t flag
    uint8_t valid
    uint8_t _pad[5]


# One vCPU thread state change, for the optional state timeline.
ctypedef struct tl_rec_t:
    uint64_t t
    uint32_t g
    uint32_t cpu
    uint8_t state
    uint8_t _pad[7]


# The constant costs, in the order of kvmwake.costs.DRAWN_COSTS then sched_slice_ns
# (cost_ns indexes the first five as an array).  A drawn cost's field holds its
# table's median, for reading only.
ctypedef struct costs_t:
    uint64_t vm_exit_ns
    uint64_t vm_entry_ns
    uint64_t ipi_send_ns
    uint64_t wake_to_run_ns
    uint64_t context_switch_ns
    uint64_t sched_slice_ns


ctypedef struct engine_t:
    thread_t* th
    virq_t* irq
    vm_t* vms
    gic_t* gic
    source_t* src
    uint64_t* times
    uint32_t* exitq           # threads that exited to userspace (a ring of nth)
    cpu_t* cpus
    op_t* ops
    uint64_t* stats           # nth x NR_STATS, row-major
    uint64_t* lat_hist        # LAT_BUCKETS
    trace_rec_t* trace        # ring buffer
    uint64_t tcap             # ring capacity (0: tracing off)
    uint64_t talloc           # entries allocated so far (grows to tcap)
    uint64_t thead            # next slot to write
    uint64_t tcount
    uint64_t tdropped
    uint32_t tr_lo            # only threads tr_lo <= g < tr_hi are traced (set_trace_threads)
    uint32_t tr_hi
    uint64_t now
    uint64_t seq
    uint64_t events
    uint64_t halts
    uint64_t err_t
    uint64_t err_n
    costs_t costs
    uint32_t nth
    uint32_t nvm
    uint32_t ncpu
    uint32_t nsrc
    uint32_t x86              # the host's arch: 0 arm64, 1 x86
    uint32_t resched_irq
    uint32_t tick_irq
    uint32_t inject_req_bit
    uint32_t exq_head
    uint32_t exq_len
    uint32_t halt_poll_ns     # module parameters (unsigned int)
    uint32_t grow
    uint32_t grow_start
    uint32_t shrink
    int32_t error             # KW_ERR_*
    uint32_t err_thread
    tl_rec_t* tl              # state timeline ring (tlcap 0: off)
    uint8_t* tlbase           # per thread: its state after the dropped records
    uint64_t tlcap
    uint64_t tlalloc
    uint64_t tlhead
    uint64_t tlcount
    uint64_t tldropped
    uint64_t tlt0             # time of the newest dropped record (window start)
    uint64_t base_slice       # EEVDF: sysctl_sched_base_slice
    uint32_t sched            # the host scheduler: SCHED_POLICY_FIFO or SCHED_POLICY_EEVDF
    uint8_t vcpu_pack         # the vCPU-pack wake placement on (core/host.pxi vcpu_pack_cpu)
    uint8_t preempt_skips_delayed  # wake-up preemption looks past delayed sleepers
    uint16_t _pad_sched
    # Placement (core/host.pxi): CPU affinity masks (aff_words uint64 words per
    # AFF_LIST mask, bit c = CPU c), each CPU's LLC group, the thread whose event
    # is being handled (the waker of any wake-up it causes; -1: none), how
    # many threads are not AFF_PINNED (0: nothing ever migrates), and how many
    # threads wait in run queues over all CPUs (rq_len summed: 0 means no CPU is
    # overloaded, rd->overloaded, and a newly idle CPU has nothing to pull).
    uint64_t* affmask
    uint32_t* llc
    uint32_t aff_words
    int32_t waker
    uint32_t nunpinned
    uint32_t nqueued
    # Costs with tails (kvmwake.costs): row c of cost_tab (KW_COST_TABLE_N values)
    # is drawn cost c's quantile table; bit c of cost_dist says cost c is drawn from
    # it (else costs_t's constant is charged, and nothing is drawn).
    uint64_t* cost_tab
    uint32_t cost_dist
    uint32_t _pad_cost
    # vCPU threads in userspace still current on their CPU under EEVDF (core/host.pxi
    # hold_cpu), in thread order: at most one per CPU (ncpu entries); derived
    # from the state on import, never stored.
    uint32_t* held
    uint32_t nheld
    uint32_t _pad_held
    # The key of the event run_loop is handling (0 outside it): where lazy poll
    # windows ending now stand (core/halt.pxi, poll_settle).
    uint64_t cur_key
    uint32_t nlazy            # threads in a lazy poll window
    uint32_t _pad_lazy
    # Islands (core/islands.pxi): in an island's engine_t, each CPU's island and
    # this one's number (the newly-idle balance pass looks at its own CPUs only),
    # and its own CPUs (isl_ncpus of them, for settle_polls); NULL in the host's.
    uint32_t* cpu_isl
    uint32_t* isl_cpus
    uint32_t isl_id
    uint32_t isl_ncpus
    evq_t q                   # the event queue (core/queue.pxi)
