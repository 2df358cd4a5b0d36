# core/rng.pxi (twin: kvmwake/reference/rng.py).
# Mirrors: no kernel code; the model's own seeded streams (the draws of guest
# compute times and device sources).
#
# Per-vCPU random streams: a 64-bit LCG with a per-stream increment and the
# SplitMix64 finaliser as output (kvmwake.reference.Engine uses the same).

cdef extern from "math.h" nogil:
    double log(double x)



cdef inline uint64_t fmix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline uint64_t splitmix64(uint64_t x) noexcept nogil:
    return fmix64(x + <uint64_t>0x9E3779B97F4A7C15)


cdef inline uint64_t rng_next(thread_t* th) noexcept nogil:
    th.rng_state = th.rng_state * KW_LCG_MULT + th.rng_inc
    return fmix64(th.rng_state)


cdef inline void rng_seed(thread_t* th, uint64_t seed, uint64_t vm_index,
                          uint64_t vcpu_id) noexcept nogil:
    cdef uint64_t h = splitmix64(seed)
    h = splitmix64(h ^ ((vm_index << 32) | vcpu_id))
    th.rng_state = splitmix64(h ^ <uint64_t>0x5851F42D4C957F2D)
    th.rng_inc = (splitmix64(h ^ <uint64_t>0x14057B7EF767814F) << 1) | 1


cdef inline uint64_t draw_ns(thread_t* th, uint16_t dist, uint64_t p0,
                             uint64_t p1) noexcept nogil:
    cdef double u, d
    if dist == DIST_FIXED:
        return p0
    if dist == DIST_EXPONENTIAL:
        u = <double>(rng_next(th) >> 11) * (1.0 / 9007199254740992.0)
        d = -log(1.0 - u) * <double>p0 + 0.5
        if d >= <double>KW_MAX_DRAW_NS:
            return KW_MAX_DRAW_NS
        return <uint64_t>d
    return p0 + rng_next(th) % (p1 - p0 + 1)


# Costs with tails (kvmwake.costs): each thread's cost stream, a stream of its own
# (stream COST_STREAM_BASE + vCPU id of its VM) so that drawing costs leaves the
# guest's draws alone; constant costs draw nothing.

cdef inline void cost_rng_seed(thread_t* th, uint64_t seed, uint64_t vm_index,
                               uint64_t vcpu_id) noexcept nogil:
    cdef uint64_t h = splitmix64(seed)
    h = splitmix64(h ^ ((vm_index << 32) | (KW_COST_STREAM_BASE + vcpu_id)))
    th.cost_rng_state = splitmix64(h ^ <uint64_t>0x5851F42D4C957F2D)
    th.cost_rng_inc = (splitmix64(h ^ <uint64_t>0x14057B7EF767814F) << 1) | 1


cdef inline uint64_t cost_ns(engine_t* e, thread_t* th, uint32_t c) noexcept nogil:
    """The cost c (COST_*) charged to thread th: the constant, or a draw from the
    cost's table: 32 bits r of th's cost stream, interval r >> 24, linear in it by
    the low 24 bits (kvmwake.costs.sample)."""
    cdef uint64_t r, lo
    cdef const uint64_t* tab
    if not ((e.cost_dist >> c) & 1):
        return (<uint64_t*>&e.costs)[c]    # costs_t opens with the drawn costs, in order
    th.cost_rng_state = th.cost_rng_state * KW_LCG_MULT + th.cost_rng_inc
    r = fmix64(th.cost_rng_state) >> 32
    tab = &e.cost_tab[<uint64_t>c * KW_COST_TABLE_N + (r >> KW_COST_FRAC_BITS)]
    lo = tab[0]
    return lo + (((tab[1] - lo) * (r & KW_COST_FRAC_MASK)) >> KW_COST_FRAC_BITS)
