"""The real kernel's MSI-to-exit latency (``analysis.msi_to_exit_ns``), the kernel's log2
histogram of a latency array (``analysis.log2_hist``, ``latency_summary``) and the
one-call recording (``record.kernel_msi_to_exit``).

The unit tests run on recordings built in the test or made by the model
(``kvmwake.kernel.synthetic``); the test marked ``kvm`` records the real kernel and
skips, with the reason, where ``/dev/kvm`` or tracefs is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvmwake.kernel as K
from kvmwake.kernel import analysis as A
from kvmwake.kernel import recording as R
from kvmwake.kernel import synthetic as Y
from kvmwake.kernel.record import kernel_msi_to_exit


def _rec(vcpu, sent, seen, ret=None, kind="msi") -> R.Recording:
    """A recording of only what ``msi_to_exit_ns`` reads: the wakes and the workload kind."""
    n = len(sent)
    wakes = {"k": np.arange(n, dtype=np.int64), "vcpu": np.asarray(vcpu, dtype=np.int64),
             "sent_ns": np.asarray(sent, dtype=np.int64),
             "seen_ns": np.asarray(seen, dtype=np.int64),
             "ret": np.asarray(ret if ret is not None else [1] * n, dtype=np.int64)}
    meta = {"vcpus": int(max(vcpu)) + 1, "workload": {"kind": kind}}
    return R.Recording(Path("."), meta, wakes, {"vcpus": []}, None)


# ---------------------------------------------------------------- by hand

def test_msi_to_exit_by_hand():
    #          wake:   0      1      2      3      4      5      6      7      8
    vcpu = [0, 0, 0, 0, 1, 1, 0, 1, 0]
    sent = [1_000, 10_000, 20_000, 21_000, 30_000, 40_000, 50_000, 60_000, 70_000]
    seen = [5_000, 13_500, 26_000, 24_000, 33_000, 47_000, 0, 61_000, 72_500]
    ret = [1, 1, 1, 1, 1, 1, 1, 0, 1]
    rec = _rec(vcpu, sent, seen, ret)
    # 0: vCPU 0's first wake, left out.  1: 3500.  2: sent at 20000, but wake 3's exit
    # (24000) comes first: queued behind it, left out.  3: 3000 (its exit is the first
    # after 21000).  4: vCPU 1's first wake, left out.  5: 7000.  6: never seen.
    # 7: not delivered (ret 0; its "seen" cannot be its own).  8: 2500.
    assert A.first_exits(rec.wakes["sent_ns"], rec.wakes["seen_ns"],
                         rec.wakes["vcpu"]).tolist() == \
        [True, True, False, True, True, True, False, True, True]
    lat = A.msi_to_exit_ns(rec)
    assert lat.dtype == np.int64 and lat.tolist() == [3_500, 3_000, 7_000, 2_500]
    # queued=True keeps wake 2 (26000 - 20000), still without the first wakes.
    assert A.msi_to_exit_ns(rec, queued=True).tolist() == [3_500, 6_000, 3_000, 7_000, 2_500]


def test_msi_to_exit_of_an_ipi_recording_is_its_start_msi_only():
    rec = _rec([0, 1, 0, 1], [100, 5_000, 9_000, 12_000], [2_100, 7_000, 10_000, 15_000],
               kind="ipi")
    assert A.msi_to_exit_ns(rec).tolist() == []          # wake 0 is vCPU 0's first wake
    rec.wakes["vcpu"][:] = [1, 0, 0, 1]
    rec.wakes["seen_ns"][:] = [2_100, 7_000, 10_000, 15_000]
    # Wake 0 is now vCPU 1's first wake too; IPIs (1..3) never count.
    assert A.msi_to_exit_ns(rec).tolist() == []
    rec = _rec([0, 0, 0], [100, 5_000, 9_000], [2_100, 7_000, 10_000], kind="ipi")
    assert A.msi_to_exit_ns(rec).tolist() == []


def test_log2_hist_is_the_kernels_layout():
    vals = [0, 1, 2, 3, 4, 7, 8, 1023, 1024, 3_000, 65_535, 65_536, 2 ** 30, 2 ** 40]
    h = A.log2_hist(vals)
    assert h.dtype == np.uint64 and h.shape == (32,) and int(h.sum()) == len(vals)
    want = np.zeros(32, dtype=np.uint64)
    # bucket min(fls64(v), 31): 0 -> 0, [2^(i-1), 2^i) -> i, all above 2^30 -> 31.
    for b in (0, 1, 2, 2, 3, 3, 4, 10, 11, 12, 16, 17, 31, 31):
        want[b] += 1
    assert h.tolist() == want.tolist()
    assert A.log2_hist([]).tolist() == [0] * 32
    with pytest.raises(ValueError, match="negative"):
        A.log2_hist([5, -1])


def test_log2_hist_matches_the_models_halt_wait_hist():
    """The model's halt_wait_hist (the core's KVM_STATS_LOG_HIST_UPDATE) of a synthetic
    recording without polling (cap 0: a halt's length, which the trace gives in ns, is
    all wait) is log2_hist of its halts' lengths."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        Y.make_recording(Path(tmp) / "r", "mixed", 200, 1, 2, cap=0)
        rec = R.load(Path(tmp) / "r")
    h = A.halts_from_events(rec.events, rec.pid_to_vcpu())
    assert h.waited.any()
    hist = rec.summed_stats()["halt_wait_hist"]
    assert A.log2_hist(h.ns[h.waited]).tolist() == np.asarray(hist).tolist()


def test_latency_summary():
    s = A.latency_summary([1_000, 2_000, 3_000, 4_000, 100_000])
    assert s["n"] == 5 and s["p50_ns"] == 3_000.0
    assert s["p90_ns"] == pytest.approx(4_000 + 0.6 * 96_000)
    assert s["p99_ns"] == pytest.approx(4_000 + 0.96 * 96_000)
    # 1000 in [512, 1024), 2000 in [1024, 2048), 3000 and 4000 in [2048, 4096), 100000
    # in [65536, 131072).
    assert s["hist"][10] == 1 and s["hist"][11] == 1 and s["hist"][12] == 2 \
        and s["hist"][17] == 1 and sum(s["hist"]) == 5
    assert all(type(c) is int for c in s["hist"])
    e = A.latency_summary(np.zeros(0, dtype=np.int64))
    assert e == {"p50_ns": None, "p90_ns": None, "p99_ns": None, "n": 0, "hist": [0] * 32}


def test_msi_to_exit_of_a_synthetic_recording(tmp_path):
    """Against a plain double loop: a wake counts where no other exit of its vCPU lies
    between its send and its own exit."""
    d = tmp_path / "r"
    Y.make_recording(d, "short", 300, 2, 2)
    rec = R.load(d)
    w = rec.wakes
    sent, seen, vc = w["sent_ns"].tolist(), w["seen_ns"].tolist(), w["vcpu"].tolist()
    want, firsts = [], set()
    for k in range(len(sent)):
        if vc[k] not in firsts:
            firsts.add(vc[k])
            continue
        if not seen[k]:
            continue
        if any(vc[j] == vc[k] and j != k and sent[k] < seen[j] < seen[k]
               for j in range(len(sent))):
            continue
        want.append(seen[k] - sent[k])
    lat = A.msi_to_exit_ns(rec)
    assert lat.tolist() == want
    queued = len(A.msi_to_exit_ns(rec, queued=True)) - len(lat)
    assert len(lat) > 50 and queued > 0        # the synthetic wakes that found a busy vCPU


# ---------------------------------------------------------------- the real kernel

AVAIL = K.available()


@pytest.mark.kvm
def test_kernel_msi_to_exit_on_the_real_kernel(tmp_path):
    if not AVAIL:
        pytest.skip(f"no usable /dev/kvm: {AVAIL.reason}")
    if not AVAIL.tracefs:
        pytest.skip(f"tracefs unusable: {AVAIL.tracefs_reason}")
    d = tmp_path / "rec"
    r = kernel_msi_to_exit(wakes=150, seed=1, trace="require", out=d)
    assert r["sent"] == 150 and r["n"] > 0 and r["n"] + r["queued"] == 149
    assert 0 < r["p50_ns"] <= r["p90_ns"] <= r["p99_ns"]
    assert len(r["hist"]) == 32 and sum(r["hist"]) == r["n"]
    rec = R.load(d, need_trace=True)
    assert rec.nvcpus == 1 and rec.meta["pinned"]
    lat = A.msi_to_exit_ns(rec)
    assert len(lat) == r["n"] and np.all(lat > 0)
    # The port exits are the vCPU thread's only returns to userspace besides the ready
    # and the stop exit: each kept wake's exit is its first after the send.
    th = rec.meta["vcpu_threads"][0]
    assert th["wakes_seen"] == 150 and th["exits"] - th["wakes_seen"] <= 2
    # A wake that ended a halt: the halt ended (trace, microseconds) before its exit.
    w = rec.wakes
    h = A.halts_from_events(rec.events, rec.pid_to_vcpu(), A.TRACE_TEXT_RESOLUTION_NS)
    wk = A.match_wakers(h, w["sent_ns"], w["vcpu"])
    has = wk >= 0
    assert has.sum() > 0
    assert np.all(h.end[has] - A.TRACE_TEXT_RESOLUTION_NS <= w["seen_ns"][wk[has]])
