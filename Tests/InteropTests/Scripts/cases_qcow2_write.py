"""qcow2 writer conformance: the same writes through Strata's NBD export
and straight into a raw reference; afterwards `qemu-img check` exits 0 and
`qemu-img compare` finds the images identical. Plus many clients at once,
and a kill -9 in the middle of a write storm."""

import errno
import os
import random
import re
import shutil
import signal
import threading
import time

import nbd

from common import DEFAULT_CMD_TIMEOUT, MiB, case, case_timeout, check, check_eq, fail, note
from cases_qcow2 import qimg, qio

WRITES = [
    "write -P 0x5a 0 1M",
    "write -P 0x11 513 1000",
    "write -z 2M 128k",
    "write -P 0x22 65500 100",
    "write -z -u 3M 64k",
    "write -P 0 5M 64k",
    "write -P 0x33 1088k 8k",
    "write -P 0x44 7M 200k",
    "write -P 0x55 15M 1M",
    "flush",
]


def writer_check(ctx, image, writes=WRITES, extra=(), discard_as_zero=False, timeout=DEFAULT_CMD_TIMEOUT):
    """Apply `writes` through the export and to a raw copy; compare."""
    ref = ctx.path("ref.raw")
    qimg(ctx, "convert", "-O", "raw", image, ref)
    srv = ctx.start_server(image, fmt="qcow2", extra=list(extra))
    argv = ["qemu-io", "-f", "raw"]
    for w in writes:
        argv += ["-c", w]
    res = ctx.run(argv + [srv.uri()], timeout=timeout)
    check("failed" not in res.out, "qemu-io through NBD: %s" % res.out[-500:])
    ref_writes = []
    for w in writes:
        if w.startswith("discard"):
            if discard_as_zero:
                ref_writes.append("write -z" + w[len("discard"):])
            continue
        ref_writes.append(w)
    qio(ctx, ref, *ref_writes, fmt="raw")
    srv.stop()
    checked = ctx.run(["qemu-img", "check", image], check=False)
    check_eq("qemu-img check exit status", 0, checked.returncode)
    ctx.qemu_img_compare_fmt(image, ref)


def _compare(ctx, image, ref):
    res = ctx.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, ref], check=False)
    if res.returncode != 0:
        fail("qemu-img compare: %s %s" % (res.out.strip(), res.err.strip()))


def image_bytes(ctx, image, name):
    """The guest's view of `image`: `qemu-img convert -O raw` into `name`, read."""
    out = ctx.path(name)
    if os.path.exists(out):
        os.unlink(out)
    qimg(ctx, "convert", "-O", "raw", image, out)
    with open(out, "rb") as f:
        return f.read()


def unexpected_sectors(data, writes, before):
    """Replays `writes` ([offset, length, value, durable], in issue order;
    writes start on 512-byte sectors) over `before`, the image before them:
    a durable write decides its bytes, any other write leaves them unknown
    (old or new may have reached the disk). Returns the offsets of the
    sectors whose bytes are decided and that `data` does not hold."""
    expected = bytearray(before)
    known = bytearray(b"\x01") * len(before)
    for offset, length, value, durable in writes:
        expected[offset:offset + length] = bytes([value]) * length
        known[offset:offset + length] = (b"\x01" if durable else b"\x00") * length
    return [i for i in range(0, len(before), 512) if known[i] and data[i:i + 512] != expected[i:i + 512]]


# A small extension of the context for qcow2 vs raw comparisons.
import common  # noqa: E402
common.Context.qemu_img_compare_fmt = _compare


def run_clients(srv, clients, work):
    """Runs one thread per client number in `clients`, each connected to
    `srv` and running `work(n, handle)`, then a flush; fails if any did."""
    errors = []

    def client(n):
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            work(n, h)
            h.flush()
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            errors.append("client %d: %s" % (n, e))

    threads = [threading.Thread(target=client, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check(not errors, "; ".join(errors))


def run_clients_and_compare(ctx, srv, img, clients, work, expected):
    """`run_clients`, then stops the server and requires a clean
    `qemu-img check` and the image to equal `expected` byte for byte."""
    run_clients(srv, clients, work)
    srv.stop()
    ref = ctx.path("expected.raw")
    with open(ref, "wb") as f:
        f.write(expected)
    check_eq("qemu-img check exit status", 0, ctx.run(["qemu-img", "check", img], check=False).returncode)
    ctx.qemu_img_compare_fmt(img, ref)


@case
def qcow2_write_plain(ctx):
    """Writes, unaligned writes, zero writes with and without unmap into an
    empty qcow2."""
    img = ctx.path("w.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "32M")
    writer_check(ctx, img)


@case
def qcow2_write_over_backing(ctx):
    """Copy-on-write from a qcow2 backing file: partial-cluster writes keep
    the backing data around them."""
    base = ctx.path("base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "32M")
    qio(ctx, base, "write -P 0x77 0 32M")
    img = ctx.path("top.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img)
    writer_check(ctx, img, writes=WRITES + ["discard 8M 128k"], extra=["--discard=unmap"], discard_as_zero=True)


@case
def qcow2_write_extended_l2(ctx):
    """Extended L2 over a backing file, 4 KiB subclusters."""
    base = ctx.path("base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "32M")
    qio(ctx, base, "write -P 0x66 0 32M")
    img = ctx.path("x.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b", "base.qcow2", "-F", "qcow2", img)
    writer_check(ctx, img)


@case
def qcow2_write_extended_l2_unmap(ctx):
    """Extended L2 over a backing file with --discard=unmap: zero writes
    that may unmap and discards (whole clusters) drop the allocation and
    read as zeroes, not as the backing file."""
    base = ctx.path("base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "32M")
    qio(ctx, base, "write -P 0x66 0 32M")
    img = ctx.path("xu.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b", "base.qcow2", "-F", "qcow2", img)
    qio(ctx, img, "write -P 0x12 0 4M")
    writer_check(ctx, img, writes=WRITES + ["discard 1M 256k", "discard 8M 128k", "write -z -u 12M 256k", "flush"],
                 extra=["--discard=unmap"], discard_as_zero=True)


@case
def qcow2_fast_zero(ctx):
    """NBD_CMD_FLAG_FAST_ZERO: on a version 3 image, cluster-aligned zeroing
    is a metadata change and succeeds; on a version 2 image (no zero
    clusters) it would need data writes, so the answer is ENOTSUP and
    nothing changes."""
    for compat, ok in (("1.1", True), ("0.10", False)):
        img = ctx.path("fz-%s.qcow2" % compat)
        qimg(ctx, "create", "-f", "qcow2", "-o", "compat=" + compat, img, "8M")
        qio(ctx, img, "write -P 0x42 0 8M")
        srv = ctx.start_server(img, fmt="qcow2")
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        check(h.can_fast_zero(), "the export advertises FAST_ZERO")
        try:
            h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
            got = 0
        except nbd.Error as e:
            got = e.errnum
        expected_data = bytes(1 << 20) if ok else b"\x42" * (1 << 20)
        check_eq("FAST_ZERO on a compat=%s image: errno" % compat, 0 if ok else errno.ENOTSUP, got)
        check(h.pread(1 << 20, 1 << 20) == expected_data, "compat=%s: the range reads as expected" % compat)
        h.shutdown()
        srv.stop()
        check_eq("qemu-img check exit status (compat=%s)" % compat, 0,
                 ctx.run(["qemu-img", "check", img], check=False).returncode)


# Zero writes narrower than a cluster (and, with 64 KiB clusters, than an
# extended-L2 subcluster), in ranges that read as zeroes, hold data, or lie
# over the backing file's data at 512k..640k; with FAST_ZERO (-n) too.
SMALL_ZEROES = [
    "write -z 401k 1k", "write -z 190k 1k", "write -z 700k 100k", "write -z 520k 4k",
    "write -z 640k 1k", "write -z 1000k 3k", "write -z -u 1100k 1k", "write -z 2047k 1k",
    "write -z 8k 2k", "write -z -n 1200k 4k", "write -z -n 100k 4k", "write -z -n 1300k 130k",
    "write -z -n 600k 2k",
]


def _outcome(output):
    """What qemu-io says of one request: the failure line, or "done"."""
    failed = re.search(r"write failed: [^\n]*", output)
    return failed.group(0) if failed else "done"


@case
def qcow2_small_zero_writes_as_in_qemu(ctx):
    """A zero write inside one cluster (one subcluster with extended L2)
    does what QEMU does: where the rest of it reads as zeroes already and
    it holds no data, all of it becomes zero in the table (freed, on a
    version 2 image without a backing file); elsewhere zeroes are written
    as data, or, with FAST_ZERO, the request fails ENOTSUP. The same
    requests through qemu-io and through Strata's export have the same
    outcome each and end in the same data and the same `qemu-img map`,
    with O_DIRECT too (where the file's 4 KiB alignment is not the
    image's) and up to an image end inside a cluster."""
    base = ctx.path("base.raw")
    qimg(ctx, "create", "-f", "raw", base, "2M")
    qio(ctx, base, "write -P 0x55 512k 128k", fmt="raw")
    backing = ["-b", "base.raw", "-F", "raw"]
    extended = ["-o", "extended_l2=on"]
    # An image ending inside a cluster and inside a subcluster (2 KiB):
    # zero writes up to the end, from a cluster's start and from inside.
    short_end = ["write -z 2044k 1k", "write -z 2038k 7k", "write -z 1984k 61k", "write -z 1920k 3k",
                 "write -z 1930k 2k"]
    for name, options, size, nocache, commands in (
            ("plain", [], "2M", False, SMALL_ZEROES),
            ("extended L2", extended, "2M", False, SMALL_ZEROES),
            ("extended L2, cache=none", extended, "2M", True, SMALL_ZEROES),
            ("extended L2, 256 KiB clusters, cache=none", ["-o", "extended_l2=on,cluster_size=256k"], "2M", True,
             SMALL_ZEROES),
            ("4 KiB clusters", ["-o", "cluster_size=4k"], "2M", False, SMALL_ZEROES),
            ("version 2", ["-o", "compat=0.10"], "2M", False, SMALL_ZEROES),
            ("over a backing file", backing, "2M", False, SMALL_ZEROES),
            ("extended L2 over a backing file", extended + backing, "2M", False, SMALL_ZEROES),
            ("version 2 over a backing file", ["-o", "compat=0.10"] + backing, "2M", False, SMALL_ZEROES),
            ("extended L2, short last cluster", extended, "2045k", False, short_end),
            ("short last cluster", [], "2045k", False, short_end)):
        theirs, ours = ctx.path("theirs.qcow2"), ctx.path("ours.qcow2")
        for path in (theirs, ours):
            qimg(ctx, "create", "-f", "qcow2", *options, path, size)
            qio(ctx, path, "write -P 0x11 0 200k", "write -P 0x12 1986k 2k")
        srv = ctx.start_server(ours, fmt="qcow2", discard="unmap", nocache_native=nocache)
        for command in commands:
            expected = ctx.run(["qemu-io", "-f", "qcow2", "-c", command, theirs], check=False)
            got = ctx.run(["qemu-io", "-f", "raw", "-c", command, srv.uri()], check=False)
            check_eq("%s: %s" % (name, command), _outcome(expected.out + expected.err), _outcome(got.out + got.err))
        srv.stop()
        compared = ctx.run(["qemu-img", "compare", theirs, ours], check=False)
        check_eq("%s: qemu-img compare" % name, 0, compared.returncode)
        check_eq("%s: qemu-img map" % name,
                 ctx.run(["qemu-img", "map", "--output=json", theirs]).out,
                 ctx.run(["qemu-img", "map", "--output=json", ours]).out)
        check_eq("%s: qemu-img check exit status" % name, 0, ctx.run(["qemu-img", "check", ours], check=False).returncode)


@case
def qcow2_write_unmap(ctx):
    """--discard=unmap --detect-zeroes=unmap: discards and zero data free
    clusters; the image stays consistent."""
    img = ctx.path("u.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "32M")
    qio(ctx, img, "write -P 0x12 0 16M")
    writer_check(ctx, img, writes=WRITES + ["discard 4M 1M", "write -P 0 9M 256k"],
                 extra=["--discard=unmap", "--detect-zeroes=unmap"], discard_as_zero=True)


@case
def qcow2_write_snapshot_cow(ctx):
    """Writing over clusters a snapshot shares copies them; the snapshot
    still reads as it was."""
    img = ctx.path("s.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "32M")
    qio(ctx, img, "write -P 0x21 0 4M")
    qimg(ctx, "snapshot", "-c", "before", img)
    before = ctx.path("before.raw")
    qimg(ctx, "convert", "-O", "raw", "-l", "snapshot.name=before", img, before)
    writer_check(ctx, img)
    after = ctx.path("after.raw")
    qimg(ctx, "convert", "-O", "raw", "-l", "snapshot.name=before", img, after)
    ctx.cmp_files(before, after, what="the snapshot after writes to the active layer")


@case
def qcow2_write_compressed(ctx):
    """Overwriting parts of compressed clusters."""
    raw = ctx.path("src.raw")
    qimg(ctx, "create", "-f", "raw", raw, "16M")
    qio(ctx, raw, "write -P 0x31 0 16M", fmt="raw")
    img = ctx.path("c.qcow2")
    qimg(ctx, "convert", "-c", "-O", "qcow2", raw, img)
    writer_check(ctx, img, writes=["write -P 0x32 100 5000", "write -P 0x33 1M 64k", "write -z 2M 64k", "flush"])


@case
def qcow2_write_small_clusters(ctx):
    """4 KiB clusters and 1-bit... 8-bit refcounts: new refcount blocks as
    the file grows."""
    img = ctx.path("small.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", img, "64M")
    writer_check(ctx, img, writes=["write -P 0x41 0 24M", "write -P 0x42 30M 4M", "write -P 0x43 12345 6789", "flush"])


@case
def qcow2_write_v2(ctx):
    """compat=0.10: no zero flag, so zero writes write zeroes."""
    img = ctx.path("v2.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "compat=0.10", img, "32M")
    writer_check(ctx, img)


@case
def qcow2_write_concurrent(ctx):
    """Eight clients write neighbouring pieces of the same unallocated
    clusters at once: every piece lands, the image checks clean."""
    img = ctx.path("cc.qcow2")
    size = 16 * MiB
    qimg(ctx, "create", "-f", "qcow2", img, str(size))
    srv = ctx.start_server(img, fmt="qcow2", extra=["-e", "8"])
    piece = 8192
    expected = bytearray(size)

    def work(n, h):
        rng = random.Random(n)
        for cluster in range(0, size // 65536, 1):
            offset = cluster * 65536 + n * piece
            data = bytes([(n * 31 + cluster) & 0xff or 1]) * piece
            h.pwrite(data, offset)
            if rng.random() < 0.05:
                h.flush()

    for n in range(8):
        for cluster in range(0, size // 65536):
            offset = cluster * 65536 + n * piece
            expected[offset:offset + piece] = bytes([(n * 31 + cluster) & 0xff or 1]) * piece
    run_clients_and_compare(ctx, srv, img, range(8), work, expected)


@case
def qcow2_crash_kill9(ctx):
    """kill -9 in the middle of a write storm: qemu-img check finds no
    corruption (leaks are allowed), and every write acknowledged before the
    last completed FLUSH reads back."""
    for lazy in ["off", "on"]:
        img = ctx.path("crash-%s.qcow2" % lazy)
        size = 64 * MiB
        qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=" + lazy, img, str(size))
        srv = ctx.start_server(img, fmt="qcow2")
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        rng = random.Random(7)
        # Every write in order: [offset, length, value, durable]; a write is
        # durable once a FLUSH after its reply completed.
        writes = []
        stop_at = time.time() + 1.5
        killed = False
        while time.time() < stop_at + 5:
            offset = rng.randrange(0, size // 4096) * 4096
            length = min(rng.choice([512, 4096, 65536, 100000]), size - offset)
            value = rng.randrange(1, 256)
            writes.append([offset, length, value, False])
            try:
                h.pwrite(bytes([value]) * length, offset)
                if rng.random() < 0.1:
                    h.flush()
                    for w in writes:
                        w[3] = True
            except nbd.Error:
                break
            if not killed and time.time() > stop_at:
                os.kill(srv.proc.pid, signal.SIGKILL)
                killed = True
        check(killed, "the server was killed mid-storm")
        srv.wait_exit(10)
        res = ctx.run(["qemu-img", "check", img], check=False)
        check(res.returncode in (0, 3), "qemu-img check after kill -9: exit %d (%s)" % (res.returncode, res.out[-400:]))
        durable_count = sum(1 for w in writes if w[3])
        note("lazy_refcounts=%s: qemu-img check exit %d, %d of %d writes durable"
             % (lazy, res.returncode, durable_count, len(writes)))
        wrong = unexpected_sectors(image_bytes(ctx, img, "after-%s.raw" % lazy), writes, bytes(size))
        check(not wrong, "sectors that a completed FLUSH covered, or that no write touched, read back wrong;"
              " first at offsets %s" % ", ".join(str(i) for i in wrong[:5]))


@case
def qcow2_write_concurrent_shared(ctx):
    """Eight clients at once over small clusters whose L2 tables a snapshot
    shares: tables are copied once, no write is lost, the snapshot is
    untouched and the image checks clean."""
    img = ctx.path("shared.qcow2")
    size = 16 * MiB
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=4k", img, str(size))
    qio(ctx, img, "write -P 0x61 0 16M")
    qimg(ctx, "snapshot", "-c", "base", img)
    before = ctx.path("before.raw")
    qimg(ctx, "convert", "-O", "raw", "-l", "snapshot.name=base", img, before)
    srv = ctx.start_server(img, fmt="qcow2", extra=["-e", "8"])
    expected = bytearray(b"\x61") * size
    piece = 1024
    plan = {}
    for n in range(8):
        rng = random.Random(100 + n)
        spots = []
        for _ in range(300):
            cluster = rng.randrange(0, size // 4096)
            offset = cluster * 4096 + n * 512 % 4096
            spots.append(offset)
        plan[n] = spots

    def work(n, h):
        for i, offset in enumerate(plan[n]):
            h.aio_pwrite(bytes([n + 1]) * piece, offset)
            if i % 16 == 15:
                while h.aio_in_flight() > 0:
                    h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)

    # Clients write disjoint 1 KiB slots (n * 512 apart, 1 KiB long: the
    # slots of clients n and n+1 overlap by 512 bytes, so replay order must
    # not matter: give each byte the highest client that wrote it last...).
    # Keep it deterministic instead: only even clients, non-overlapping slots.
    for n in range(0, 8, 2):
        for offset in plan[n]:
            expected[offset:offset + piece] = bytes([n + 1]) * piece
    run_clients_and_compare(ctx, srv, img, range(0, 8, 2), work, expected)
    after = ctx.path("after.raw")
    qimg(ctx, "convert", "-O", "raw", "-l", "snapshot.name=base", img, after)
    ctx.cmp_files(before, after, what="the snapshot after concurrent writes")


@case
def qcow2_lazy_refcounts_dirty_bit(ctx):
    """With lazy refcounts the dirty bit is set while the image is open for
    writing and cleared by a clean close; after kill -9 it stays set, and
    the next read-write open repairs the refcounts and clears it."""
    import json as _json
    img = ctx.path("lazy.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")

    def dirty():
        out = ctx.run(["qemu-img", "info", "-U", "--output=json", img]).out
        return _json.loads(out).get("dirty-flag")

    srv = ctx.start_server(img, fmt="qcow2")
    ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x71 0 1M", srv.uri()])
    check_eq("dirty bit while open", True, dirty())
    srv.stop()
    check_eq("dirty bit after a clean close", False, dirty())
    srv = ctx.start_server(img, fmt="qcow2")
    ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x72 2M 1M", srv.uri()])
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.wait_exit(10)
    check_eq("dirty bit after kill -9", True, dirty())
    srv = ctx.start_server(img, fmt="qcow2")
    srv.stop()
    check_eq("dirty bit after reopening and closing", False, dirty())
    check_eq("qemu-img check after the repair", 0, ctx.run(["qemu-img", "check", img], check=False).returncode)


@case
def qcow2_discarded_clusters_are_reused(ctx):
    """--discard=unmap: clusters a discard frees are allocated again, as
    QEMU does, so discarding and rewriting does not grow the file; the same
    writes with qemu-io leave a file no smaller. (Strata frees a cluster
    once the tables that dropped it are on disk, hence the flushes; QEMU
    frees at once.)"""
    writes = ["write -P 0x61 0 8M", "flush", "discard 0 8M", "flush",
              "write -P 0x62 16M 8M", "discard 18M 1M", "flush", "write -P 0x63 40M 1M", "flush"]
    img = ctx.path("reuse.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "64M")
    writer_check(ctx, img, writes=writes, extra=["--discard=unmap"], discard_as_zero=True)
    theirs = ctx.path("reuse-qemu.qcow2")
    qimg(ctx, "create", "-f", "qcow2", theirs, "64M")
    argv = ["qemu-io", "-d", "unmap", "-f", "qcow2"]
    for w in writes:
        argv += ["-c", w]
    ctx.run(argv + [theirs])
    ours, qemu = os.path.getsize(img), os.path.getsize(theirs)
    note("file size after the writes: strata %d, qemu-io %d" % (ours, qemu))
    check(ours <= qemu, "the image grew to %d bytes; qemu-io's to %d" % (ours, qemu))


@case
def qcow2_discard_and_write_storm(ctx):
    """Four clients write, overwrite, discard and read their own clusters
    at once, so clusters are freed and handed out again under in-flight
    writes and reads: every read sees the client's own last data, every
    byte reads back at the end, the image checks clean, and the file stays
    near the data it holds. (Reads of cached data go out with sendfile.)"""
    img = ctx.path("storm.qcow2")
    size = 32 * MiB
    cluster = 65536
    qimg(ctx, "create", "-f", "qcow2", img, str(size))
    srv = ctx.start_server(img, fmt="qcow2", extra=["-e", "4", "--discard=unmap"])
    expected = bytearray(size)
    per_client = size // 4 // cluster

    def work(n, h):
        rng = random.Random(n)
        base = n * per_client * cluster
        for step in range(600):
            offset = base + rng.randrange(per_client) * cluster
            choice = rng.random()
            if choice < 0.2:
                got = h.pread(cluster, offset)
                if got != bytes(expected[offset:offset + cluster]):
                    raise RuntimeError("read of its own cluster at %d returned other data" % offset)
            elif choice < 0.45:
                h.trim(cluster, offset)
                expected[offset:offset + cluster] = bytes(cluster)
            else:
                start = offset + rng.randrange(0, cluster, 4096)
                length = min(offset + cluster - start, 4096 * rng.randrange(1, 9))
                data = bytes([(n * 64 + step) % 255 + 1]) * length
                h.pwrite(data, start)
                expected[start:start + length] = data
            if rng.random() < 0.1:
                h.flush()

    run_clients_and_compare(ctx, srv, img, range(4), work, expected)
    # Without reuse the ~700 clusters rewritten after a discard come on top
    # of the 512 first allocated (about 75 MiB); with it the file holds the
    # live clusters, plus those freed since the last flush.
    note("file size after the storm: %d" % os.path.getsize(img))
    check(os.path.getsize(img) < size + 8 * MiB, "the image grew to %d bytes" % os.path.getsize(img))


@case
def qcow2_unsent_read_keeps_its_clusters(ctx):
    """A client asks for part of a cached range and does not read the
    reply; meanwhile a second client discards that range, flushes (the
    clusters are free) and writes 4 MiB elsewhere. The first reply still
    carries the discarded range's data. 4 MiB does not fit in the socket's
    buffers: the clusters it is sent from (sendfile) are not handed out
    until it has gone out. 128 KiB does: the socket then holds references
    to the page cache pages, not copies, so the freed clusters are punched
    out of the file (discard=unmap, as QEMU) before they are handed out,
    and the next owner writes to fresh pages. Before the fixes, every page
    of either reply held the new data."""
    for size in (4 * MiB, 128 * 1024):
        img = ctx.path("unsent-%d.qcow2" % size)
        qimg(ctx, "create", "-f", "qcow2", img, "64M")
        qio(ctx, img, "write -P 0x11 0 4M")
        with open(img, "rb") as f:  # into the page cache
            while f.read(MiB):
                pass
        srv = ctx.start_server(img, fmt="qcow2", shared=2, discard="unmap")
        reader, writer = nbd.NBD(), nbd.NBD()
        reader.connect_uri(srv.uri())
        writer.connect_uri(srv.uri())
        reader.pread(4096, 0)  # loads the L2 table, so the next read is sent from the cache
        buf = nbd.Buffer(size)
        cookie = reader.aio_pread(buf, 0)
        time.sleep(0.5)  # the request reaches the server; its reply is not read
        writer.trim(4 * MiB, 0)
        writer.flush()
        writer.pwrite(b"\x22" * (4 * MiB), 8 * MiB)
        writer.flush()
        while not reader.aio_command_completed(cookie):
            reader.poll(-1)
        data = buf.to_bytearray()
        wrong = sum(1 for i in range(0, len(data), 4096) if data[i:i + 4096] != b"\x11" * 4096)
        check_eq("pages of the %d-byte reply not holding the discarded range's data" % size, 0, wrong)
        reader.shutdown()
        writer.shutdown()
        srv.stop()
        check_eq("qemu-img check exit status", 0, ctx.run(["qemu-img", "check", img], check=False).returncode)


@case
def serve_snapshot_leaves_the_image_unchanged(ctx):
    """-s (--snapshot): writes go to a temporary qcow2 overlay in $TMPDIR,
    which is unlinked while the server runs; the image is unchanged."""
    for fmt in ("qcow2", "raw"):
        img = ctx.path("snap-base.%s" % fmt)
        qimg(ctx, "create", "-f", fmt, img, "16M")
        qio(ctx, img, "write -P 0x22 0 2M", fmt=fmt)
        orig = ctx.path("snap-orig.%s" % fmt)
        shutil.copyfile(img, orig)
        tmp = ctx.path("snap-tmp-%s" % fmt)
        os.mkdir(tmp)
        srv = ctx.start_server(img, fmt=fmt, extra=["-s"], env={"TMPDIR": tmp})
        res = ctx.run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 0 1M", "-c", "write -P 0x11 0 1M",
                       "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", "-c", "write -z 3M 1M",
                       "-c", "read -P 0 3M 1M", srv.uri()])
        check("fail" not in res.out and "Pattern verification" not in res.out,
              "qemu-io through the -s export (%s): %s" % (fmt, res.out[-500:]))
        check_eq("files left in TMPDIR while serving (%s)" % fmt, [], os.listdir(tmp))
        srv.stop()
        check_eq("files left in TMPDIR after the server (%s)" % fmt, [], os.listdir(tmp))
        same = ctx.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, img, orig], check=False)
        check_eq("qemu-img compare of the image with its copy from before (%s)" % fmt, 0, same.returncode)


@case_timeout(300)
@case
def qcow2_write_grows_refcount_table(ctx):
    """512-byte clusters: one refcount table cluster covers 8 MiB of file,
    so writing 24 MiB grows the refcount table (twice), crash-safely; the
    image checks clean and reads back.  Some 40,000 cluster allocations,
    with metadata flushed in order, take ~5 s on a quiet disk (qemu-nbd
    ~7 s) but 50 s and more while the VM's disk is slow: a longer limit."""
    img = ctx.path("tiny.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=512", img, "64M")
    writer_check(ctx, img, writes=["write -P 0x51 0 4M", "write -P 0x52 20M 16M", "write -P 0x53 5000 3000", "flush"],
                 timeout=240)


@case
def qcow2_hostile_metadata(ctx):
    """Hostile tables: an L2 entry pointing into the L1 table is refused on
    write (the image is marked corrupt, as QEMU does, and takes no more
    writes; reads go on) and an unaligned one fails the read; a corrupt
    image will not open read-write. No crash. (The write comes first: a
    read of the unaligned entry would mark the image by itself, see
    qcow2_read_of_a_bad_entry_marks_the_image_corrupt.)"""
    img = ctx.path("h.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    qio(ctx, img, "write -P 0x11 0 128k")
    with open(img, "r+b") as f:
        head = f.read(72)
        l1_offset = int.from_bytes(head[40:48], "big")
        f.seek(l1_offset)
        l2_offset = int.from_bytes(f.read(8), "big") & 0x00fffffffffffe00
        # Cluster 0 now claims to live at the L1 table (COPIED set).
        f.seek(l2_offset)
        f.write(((1 << 63) | l1_offset).to_bytes(8, "big"))
        # Cluster 1 at an unaligned host offset.
        f.write(((1 << 63) | 0x12345600).to_bytes(8, "big"))
    srv = ctx.start_server(img, fmt="qcow2")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        h.pwrite(b"\xee" * 512, 0)
        fail("writing over the L1 table must fail")
    except nbd.Error as e:
        note("write into metadata: %s" % e)
    check("Marking image as corrupt: Preventing invalid write on metadata" in srv.stderr_text(),
          "the write into metadata marks the image: %s" % srv.stderr_text()[-300:])
    try:
        h.pread(512, 65536)
        fail("reading an unaligned cluster must fail")
    except nbd.Error as e:
        note("read of an unaligned cluster: %s" % e)
    # Marked corrupt, the image takes no more changes anywhere; reads of
    # sound clusters go on, so the data can be copied off.
    try:
        h.pwrite(b"\x22" * 4096, 8 << 20)
        fail("a write after the image was marked corrupt must fail")
    except nbd.Error as e:
        note("later write to a sound cluster: %s" % e)
    check(h.pread(4096, 4 << 20) == b"\0" * 4096, "a sound cluster still reads")
    h.shutdown()
    srv.stop()
    check("Marking image as corrupt" in srv.stderr_text(),
          "the server says so: %s" % srv.stderr_text()[-300:])
    info = ctx.run(["qemu-img", "info", "--output=json", img]).out
    check('"corrupt": true' in info, "the image is marked corrupt: %s" % info)
    srv = ctx.start_server(img, fmt="qcow2", wait=False)
    status = srv.wait_exit(20)
    check(status not in (None, 0), "a corrupt image does not open read-write (exit %s)" % status)
    check("corrupt" in srv.stderr_text(), "the refusal says why: %s" % srv.stderr_text()[-300:])
    # Read-only still works.
    srv = ctx.start_server(img, fmt="qcow2", readonly=True)
    srv.stop()


@case
def qcow2_l2_table_over_metadata_refused(ctx):
    """An L1 entry with COPIED that names the L1 table's own cluster as its
    L2 table: a write that would change that table is refused before it
    lands, the image is marked corrupt in QEMU's words (qemu-io gives
    "overlaps with active L1 table" too) and the file changes nowhere but
    in the header's corrupt bit."""
    img = ctx.path("o.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    qio(ctx, img, "write -P 0x11 0 64k")
    with open(img, "r+b") as f:
        l1_offset = int.from_bytes(f.read(72)[40:48], "big")
        f.seek(l1_offset)
        f.write(((1 << 63) | l1_offset).to_bytes(8, "big"))
    with open(img, "rb") as f:
        before = f.read()
    srv = ctx.start_server(img, fmt="qcow2")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        # Cluster 1: unallocated in the "table", so the write must add an entry.
        h.pwrite(b"\x22" * 4096, 65536)
        h.flush()
        fail("a write into an L2 table that is the L1 table must fail")
    except nbd.Error as e:
        note("write: %s" % e)
    h.shutdown()
    srv.stop()
    check_eq("corruption event", "qcow2: Marking image as corrupt: Preventing invalid write on metadata "
             "(overlaps with active L1 table); further corruption events will be suppressed",
             _corruption_event(srv.stderr_text()))
    with open(img, "rb") as f:
        after = f.read()
    changed = [i for i in range(min(len(before), len(after))) if before[i] != after[i]]
    check(changed == [79], "only the corrupt bit changed: bytes %s" % changed[:8])
    check(len(after) == len(before), "the file did not grow: %d -> %d" % (len(before), len(after)))


def _corruption_event(text):
    """The qcow2 corruption line in a tool's stderr, without any prefix."""
    found = re.search(r"qcow2: (Marking image as corrupt|Image is corrupt): [^\n]*", text)
    return found.group(0) if found else None


def _misaligned_image(ctx, path, damage):
    """A 1 GiB qcow2 with data in its first two clusters, then damaged:
    the second cluster's entry moved off the grid ("data cluster"), made
    a preallocated zero cluster off the grid ("zero cluster"), made a
    compressed cluster in an image with an external data file ("compressed
    cluster", which QEMU refuses to read), pointed the second cluster of
    such an image somewhere other than its guest offset ("data file
    offset"), the first L2 table's L1 entry moved off the grid ("L2
    table"), or, with extended L2, the second cluster's first subcluster
    made both allocated and zero ("subcluster allocated and zero"), its
    entry's host cluster dropped with a subcluster left allocated
    ("subcluster without a cluster"), or its entry moved off the grid with
    bit 0 set ("extended zero cluster", which QEMU names by that bit). 1 GiB: writes past the first L2
    table's reach (512 MiB) touch nothing the damage does."""
    with_data_file = damage in ("compressed cluster", "data file offset")
    extended = damage.startswith("subcluster") or damage.startswith("extended")
    options = ["-o", "data_file=" + ctx.path("data.raw")] if with_data_file else []
    options += ["-o", "extended_l2=on"] if extended else []
    qimg(ctx, "create", "-f", "qcow2", *options, path, "1G")
    qio(ctx, path, "write -P 0x11 0 128k")
    with open(path, "r+b") as f:
        l1_offset = int.from_bytes(f.read(48)[40:48], "big")
        f.seek(l1_offset)
        l2_offset = int.from_bytes(f.read(8), "big") & 0x00fffffffffffe00
        if damage == "subcluster allocated and zero":
            f.seek(l2_offset + 24)
            f.write((0xffffffff | 1 << 32).to_bytes(8, "big"))
        elif damage == "extended zero cluster":
            f.seek(l2_offset + 16)
            f.write(((1 << 63) | 0x12345600 | 1).to_bytes(8, "big"))
        elif damage == "subcluster without a cluster":
            f.seek(l2_offset + 16)
            f.write((0).to_bytes(8, "big") + (1 << 3).to_bytes(8, "big"))
        elif damage == "L2 table":
            f.seek(l1_offset)
            f.write(((1 << 63) | (l2_offset + 0x200)).to_bytes(8, "big"))
        elif damage == "data file offset":
            f.seek(l2_offset + 8)
            f.write(((1 << 63) | 0x40000).to_bytes(8, "big"))
        elif damage == "compressed cluster":
            f.seek(l2_offset + 8)
            f.write(((1 << 62) | 0x50000).to_bytes(8, "big"))
        else:
            zero = 1 if damage == "zero cluster" else 0
            f.seek(l2_offset + 8)
            f.write(((1 << 63) | 0x12345600 | zero).to_bytes(8, "big"))


def _same_corruption_as_qemu_io(ctx, damage, command, readonly=False):
    """`command` (a qemu-io read or write) on a damaged image through qemu-io
    and through Strata's export: both fail, both say the same corruption
    line, and both leave the image marked corrupt (not when read-only)."""
    mode = "read-only" if readonly else "read-write"
    what = "%s, %s, %s" % (damage, command, mode)
    pristine, theirs, ours = ctx.path("pristine.qcow2"), ctx.path("theirs.qcow2"), ctx.path("ours.qcow2")
    _misaligned_image(ctx, pristine, damage)
    shutil.copyfile(pristine, theirs)
    shutil.copyfile(pristine, ours)
    qemu = ctx.run(["qemu-io", "-f", "qcow2"] + (["-r"] if readonly else []) + ["-c", command, theirs],
                   check=False)
    expected = _corruption_event(qemu.err + qemu.out)
    check(expected is not None, "%s: qemu-io reports the corruption: %s" % (what, qemu.err))
    verb, offset, length = command.split()[0], int(command.split()[-2]), int(command.split()[-1])
    srv = ctx.start_server(ours, fmt="qcow2", readonly=readonly)
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    try:
        if verb == "read":
            h.pread(length, offset)
        else:
            h.pwrite(b"\x22" * length, offset)
        fail("%s: must fail" % what)
    except nbd.Error as e:
        check_eq("%s: errno" % what, errno.EIO, e.errnum)
    if not readonly:
        try:
            h.pwrite(b"\x22" * 4096, 600 << 20)
            fail("%s: a write after the image was marked corrupt must fail" % what)
        except nbd.Error as e:
            check_eq("%s: errno of a later write to a sound cluster" % what, errno.EIO, e.errnum)
    h.shutdown()
    srv.stop()
    check_eq("%s: the server's corruption line" % what, expected, _corruption_event(srv.stderr_text()))
    for path, who in ((theirs, "qemu-io"), (ours, "Strata")):
        info = ctx.run(["qemu-img", "info", "--output=json", "-U", path]).out
        marked = '"corrupt": true' in info
        check(marked == (not readonly), "%s, after %s: marked corrupt %s" % (what, who, marked))


@case
def qcow2_read_of_a_bad_entry_marks_the_image_corrupt(ctx):
    """A read that meets an L2 table or a cluster off the cluster grid, a
    compressed cluster where an external data file holds the data, or an
    extended-L2 bitmap QEMU calls invalid, does
    what it does in QEMU: on a read-write image, the image is marked
    corrupt on disk (the server's stderr has qemu-io's line, word for
    word) and takes no more writes; read-only, the server says so in
    qemu-io's words and leaves the image as it was."""
    for damage in ("data cluster", "zero cluster", "compressed cluster", "data file offset", "L2 table",
                   "subcluster allocated and zero", "subcluster without a cluster"):
        for readonly in (True, False):
            _same_corruption_as_qemu_io(ctx, damage, "read 65536 512", readonly=readonly)


@case
def qcow2_write_to_a_misaligned_cluster_marks_the_image_corrupt(ctx):
    """A write to a cluster the image owns at an offset off the grid, or
    to an extended-L2 cluster whose bitmap QEMU calls invalid (whichever
    subcluster it touches), fails and marks the image corrupt, in
    qemu-io's words (which name the guest offset of the part of the write
    in a misaligned cluster)."""
    for damage, command in (("data cluster", "write 70000 512"), ("zero cluster", "write 70000 512"),
                            ("data cluster", "write 60000 10000"), ("L2 table", "write 70000 512"),
                            ("subcluster allocated and zero", "write 70000 512"),
                            ("subcluster allocated and zero", "write 65536 65536"),
                            ("subcluster without a cluster", "write 70000 512"),
                            ("extended zero cluster", "write 70000 512")):
        _same_corruption_as_qemu_io(ctx, damage, command)


@case
def qcow2_reserved_entry_bits_are_read_as_qemu_reads_them(ctx):
    """Reserved bits in an L1 and an L2 entry are check's to report: QEMU
    reads and writes through such entries as if the bits were clear, and
    so does Strata; neither marks the image corrupt, and qemu-img check
    then reports the same bits in both copies."""
    pristine, theirs, ours = ctx.path("pristine.qcow2"), ctx.path("theirs.qcow2"), ctx.path("ours.qcow2")
    qimg(ctx, "create", "-f", "qcow2", pristine, "16M")
    qio(ctx, pristine, "write -P 0x11 0 128k")
    with open(pristine, "r+b") as f:
        l1_offset = int.from_bytes(f.read(48)[40:48], "big")
        f.seek(l1_offset)
        l1_entry = int.from_bytes(f.read(8), "big")
        f.seek(l1_offset)
        f.write((l1_entry | 1 << 1 | 1 << 56).to_bytes(8, "big"))
        l2_offset = l1_entry & 0x00fffffffffffe00
        f.seek(l2_offset)
        l2_entry = int.from_bytes(f.read(8), "big")
        f.seek(l2_offset)
        f.write((l2_entry | 1 << 2 | 1 << 57).to_bytes(8, "big"))
    shutil.copyfile(pristine, theirs)
    shutil.copyfile(pristine, ours)
    qio(ctx, theirs, "read -P 0x11 0 128k", "write -P 0x22 4k 4k", "write -P 0x33 1M 64k")
    srv = ctx.start_server(ours, fmt="qcow2")
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    check(h.pread(131072, 0) == b"\x11" * 131072, "the data under both entries reads back")
    h.pwrite(b"\x22" * 4096, 4096)
    h.pwrite(b"\x33" * 65536, 1 << 20)
    h.shutdown()
    srv.stop()
    check(_corruption_event(srv.stderr_text()) is None, "no corruption event: %s" % srv.stderr_text()[-300:])
    ctx.qemu_img_compare(theirs, ours)
    theirs_check = ctx.run(["qemu-img", "check", theirs], check=False)
    ours_check = ctx.run(["qemu-img", "check", ours], check=False)
    check_eq("qemu-img check after the writes (status, report)", (theirs_check.returncode, theirs_check.err),
             (ours_check.returncode, ours_check.err))
    for path in (theirs, ours):
        check('"corrupt": false' in ctx.run(["qemu-img", "info", "--output=json", path]).out,
              "%s is not marked corrupt" % path)


@case
def qcow2_header_rewrites_keep_unknowns(ctx):
    """Unknown header extensions and compatible bits survive header
    rewrites (lazy refcounts rewrite the header on open and close); unknown
    autoclear bits are cleared on a read-write open. A small L2 cache
    (--l2-cache-size) still gives the right data."""
    img = ctx.path("k.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        compatible = int.from_bytes(head[80:88], "big") | (1 << 40)
        head[80:88] = compatible.to_bytes(8, "big")
        autoclear = int.from_bytes(head[88:96], "big") | (1 << 33)
        head[88:96] = autoclear.to_bytes(8, "big")
        # Insert an unknown extension before the others.
        length = int.from_bytes(head[100:104], "big")
        ext = (0x51AB51AB).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"hello\0\0\0"
        head[length:length] = ext
        f.seek(0)
        f.write(bytes(head[:4096]))
    srv = ctx.start_server(img, fmt="qcow2", extra=["--l2-cache-size=128k"])
    ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4M", "-c", "read -P 0x44 0 4M", srv.uri()])
    srv.stop()
    with open(img, "rb") as f:
        head = f.read(4096)
    check(int.from_bytes(head[80:88], "big") & (1 << 40), "the unknown compatible bit survived")
    check(not int.from_bytes(head[88:96], "big") & (1 << 33), "the unknown autoclear bit was cleared")
    check(b"hello" in head and (0x51AB51AB).to_bytes(4, "big") in head, "the unknown extension survived")
    check_eq("qemu-img check", 0, ctx.run(["qemu-img", "check", img], check=False).returncode)


@case
def qcow2_write_data_file(ctx):
    """Writes into images with an external data file, raw and not, with and
    without extended L2: the data file stays in step (qemu-img compare reads
    it through the image), and the map is the one qemu-io's same writes
    give: with extended L2 only the written subclusters become allocated,
    and zero writes into a raw data file zero it and set the zero flag."""
    for raw_flag, extended in [("off", "off"), ("on", "off"), ("off", "on"), ("on", "on")]:
        name = "wd-%s-%s" % (raw_flag, extended)
        img = ctx.path(name + ".qcow2")
        data = ctx.path(name + ".data")
        options = "data_file=%s,data_file_raw=%s,extended_l2=%s" % (data, raw_flag, extended)
        qimg(ctx, "create", "-f", "qcow2", "-o", options, img, "32M")
        # qemu-io opens images with unmapping allowed; the server as qemu-nbd.
        writer_check(ctx, img, extra=["--discard=unmap"])
        if raw_flag == "on":
            ref = ctx.path("ref.raw")
            ctx.cmp_files(ref, data, what="the raw data file holds the guest's bytes")
        theirs = ctx.path(name + "-qemu.qcow2")
        qimg(ctx, "create", "-f", "qcow2", "-o", options.replace(data, data + "-qemu"), theirs, "32M")
        for command in WRITES:
            qio(ctx, theirs, command)
        maps = [ctx.run(["qemu-img", "map", "--output=json", path]).out for path in (img, theirs)]
        check_eq("%s: qemu-img map after the same writes through Strata and qemu-io" % name, maps[1], maps[0])


@case
def qcow2_write_marks_bitmaps_in_use(ctx):
    """Strata keeps persistent bitmaps but does not track writes in them:
    opened for writing, each is flagged in-use (inconsistent), as QEMU does
    for an image it has open, so no backup tool trusts a stale bitmap. The
    image still checks clean."""
    img = ctx.path("bm.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    ctx.run(["qemu-img", "bitmap", "--add", img, "b0"])
    writer_check(ctx, img, writes=["write -P 0x13 0 1M", "flush"])
    info = ctx.run(["qemu-img", "info", img]).out
    check("in-use" in info, "the bitmap is flagged in-use: %s" % info)


def extension_types(path):
    """The header extension types of a qcow2 file, in file order."""
    with open(path, "rb") as f:
        head = f.read(65536)
    offset, types = int.from_bytes(head[100:104], "big"), []
    while offset + 8 <= len(head):
        kind, length = int.from_bytes(head[offset:offset + 4], "big"), int.from_bytes(head[offset + 4:offset + 8], "big")
        if kind == 0:
            break
        types.append(kind)
        offset += 8 + (length + 7) // 8 * 8
    return types


@case
def qcow2_stale_bitmaps_extension_is_dropped(ctx):
    """A bitmaps extension whose autoclear bit a program without bitmap
    support cleared: opened for writing, Strata drops it from the header as
    qemu-io does the same image (the header cluster ends up the same byte
    for byte), so qemu-img stops warning about it; check says the same of
    both (the bitmaps' clusters leak)."""
    ours, theirs = ctx.path("stale.qcow2"), ctx.path("stale-qemu.qcow2")
    qimg(ctx, "create", "-f", "qcow2", ours, "16M")
    ctx.run(["qemu-img", "bitmap", "--add", ours, "b0"])
    with open(ours, "r+b") as f:
        f.seek(88)
        f.write(bytes(8))
    shutil.copyfile(ours, theirs)
    check(0x23852875 in extension_types(ours), "the image has a bitmaps extension to begin with")
    srv = ctx.start_server(ours, fmt="qcow2")
    ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k", srv.uri()])
    srv.stop()
    ctx.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 64k", theirs])
    check_eq("header extensions after a write", extension_types(theirs), extension_types(ours))
    check(0x23852875 not in extension_types(ours), "the stale bitmaps extension is gone")
    # QEMU writes the whole header cluster, so no old extension bytes are left.
    heads = []
    for path in (ours, theirs):
        with open(path, "rb") as f:
            heads.append(f.read(65536))
    check(heads[0] == heads[1], "the header cluster is qemu-io's byte for byte")
    info = ctx.run(["qemu-img", "info", ours])
    check("bitmap" not in info.err, "qemu-img no longer warns: %s" % info.err)
    results = [ctx.run(["qemu-img", "check", path], check=False).returncode for path in (ours, theirs)]
    check_eq("qemu-img check exit status", results[1], results[0])
