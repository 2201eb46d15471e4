"""Bulk data cases: nbdcopy both ways (single and multi-connection) and a
scripted qemu-io sequence compared against a local reference file."""

import json
import os
import re
import shutil

import nbd

from common import (KiB, MiB, STD_EXTENTS, STD_SIZE, CaseFailure, Options, case, check,
                    check_bytes, check_eq, fail, make_sparse_image, note, pattern)


def random_image(path, size, seed):
    """Random data with some all-zero 64 KiB blocks (exercises zero
    detection in nbdcopy).  Returns the content."""
    data = bytearray(pattern(seed, size))
    for off in range(0, size, 1 * MiB):
        data[off + 128 * KiB:off + 256 * KiB] = bytes(128 * KiB)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


@case
def nbdcopy_out(ctx):
    """nbdcopy from the export to a local file yields a byte-identical copy
    of the (sparse) image."""
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    srv = ctx.start_server(img)
    out = ctx.path("copy.raw")
    ctx.run(["nbdcopy", srv.uri(), out], timeout=60, what="nbdcopy export -> file")
    ctx.cmp_files(img, out, what="image vs nbdcopy output")


@case
def nbdcopy_in(ctx):
    """nbdcopy from a random local file into the export (data and zero
    blocks), then the image equals the source, both through the server
    (qemu-img compare over NBD) and on disk after the server stopped."""
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    src = ctx.path("source.raw")
    random_image(src, STD_SIZE, seed=77)
    srv = ctx.start_server(img)
    ctx.run(["nbdcopy", "--flush", src, srv.uri()], timeout=60,
            what="nbdcopy file -> export")
    ctx.qemu_img_compare(src, srv.uri(), what="source vs export (over NBD)")
    srv.stop()
    ctx.qemu_img_compare(src, img, what="source vs image file after stop")


@case
def nbdcopy_multiconn(ctx):
    """With -e 4 the export advertises multi-conn, and nbdcopy
    --connections=4 copies out and in correctly."""
    size = 24 * MiB
    img = ctx.path("disk.raw")
    extents = [(0, 4 * MiB), (6 * MiB, 3 * MiB), (12 * MiB, 64 * KiB),
               (20 * MiB, 4 * MiB)]
    make_sparse_image(img, size, extents, seed=5)
    srv = ctx.start_server(img, shared=4)

    info = json.loads(ctx.run(["nbdinfo", "--json", srv.uri()], timeout=20).out)
    check_eq("can_multi_conn with -e 4", True, info["exports"][0].get("can_multi_conn"))

    out = ctx.path("copy.raw")
    ctx.run(["nbdcopy", "--connections=4", "--requests=16", srv.uri(), out],
            timeout=60, what="nbdcopy --connections=4 export -> file")
    ctx.cmp_files(img, out, what="image vs 4-connection copy")

    src = ctx.path("source.raw")
    random_image(src, size, seed=99)
    ctx.run(["nbdcopy", "--connections=4", "--requests=16", "--flush", src,
             srv.uri()], timeout=60, what="nbdcopy --connections=4 file -> export")
    ctx.qemu_img_compare(src, srv.uri(), what="source vs export (over NBD)")
    srv.stop()
    ctx.qemu_img_compare(src, img, what="source vs image file after stop")


# ---------------------------------------------------------------------------
# qemu-io sequence

M = MiB
K = KiB
QEMU_IO_OPS = [
    "write -P 0x5a 0 65536",
    "write -P 0x11 513 1000",              # unaligned, inside a sector pair
    "write -P 0x22 4095 2",                # straddles a 4 KiB boundary
    "write -P 0x33 70000 12345",           # unaligned start and end
    "write -f -P 0x34 %d 4096" % (200 * K),   # FUA write into a hole
    "write -P 0x44 %d %d" % (1 * M, 256 * K),
    "write -z %d %d" % (1 * M + 4 * K, 8 * K),
    "write -z %d 3000" % (1 * M + 100 * K + 17),   # unaligned write-zeroes
    "write -z -u %d %d" % (2 * M, 128 * K),         # zero+unmap over a hole
    "write -z -u %d %d" % (3 * M + 64 * K, 64 * K),  # zero+unmap over data
    "discard %d %d" % (3 * M + 256 * K, 128 * K),   # aligned discard of data
    "write -P 0x00 %d %d" % (3 * M + 384 * K, 128 * K),  # explicit zero data
    "flush",
    "write -P 0x66 %d %d" % (5 * M + 300 * K, 100 * K),
    "write -z -f %d %d" % (6 * M, 64 * K),       # FUA write-zeroes
    "write -P 0x77 %d 4096" % (STD_SIZE - 4096),   # last block
    "write -P 0x78 %d 1" % (STD_SIZE - 1),         # last byte
    "flush",
]
# Ranges that must read back as holes with --discard=unmap
# --detect-zeroes=unmap: zero+unmap over data, discard, explicit zeroes.
UNMAP_HOLES = [(2 * M, 128 * K), (3 * M + 64 * K, 64 * K),
               (3 * M + 256 * K, 256 * K)]


def qemu_io(ctx, target, ops, extra=(), what="qemu-io"):
    argv = ["qemu-io", "-f", "raw", *extra]
    for op in ops:
        argv += ["-c", op]
    argv.append(target)
    res = ctx.run(argv, timeout=60, what=what)
    # qemu-io keeps going after a failed command and still exits 0.
    for line in (res.out + res.err).splitlines():
        low = line.lower()
        if "failed" in low or "error" in low:
            fail("%s reported an error: %r\n  full output:\n%s%s"
                 % (what, line, res.out, res.err))
    return res


def holes_in(uri, ranges):
    """For each range, the list of (length, flags) base:allocation extents."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    result = []
    for off, length in ranges:
        got = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(length, off, cb)
        result.append((off, length, got))
    h.shutdown()
    return result


def ops_touching(offset):
    """The QEMU_IO_OPS entries whose range covers ``offset``."""
    hits = []
    for op in QEMU_IO_OPS:
        words = op.split()
        if words[0] not in ("write", "discard"):
            continue
        off, length = int(words[-2]), int(words[-1])
        if off <= offset < off + length:
            hits.append(op)
    return hits


def compare_with_hint(ctx, ref, target, what):
    try:
        ctx.qemu_img_compare(ref, target, what=what)
    except CaseFailure as e:
        m = re.search(r"mismatch at offset (\d+)", str(e))
        if m:
            off = int(m.group(1))
            fail("%s\n  qemu-io commands covering offset %d: %s"
                 % (e, off, ops_touching(off) or "none (original image data)"))
        raise


def run_qemu_io_compare(ctx, server_opts, ref_discard, expect_holes):
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    ref = ctx.path("reference.raw")
    shutil.copyfile(img, ref)
    srv = ctx.start_server(img, **server_opts)

    qemu_io(ctx, srv.uri(), QEMU_IO_OPS, what="qemu-io over NBD")
    qemu_io(ctx, ref, QEMU_IO_OPS, extra=("-d", ref_discard),
            what="qemu-io on the reference file")
    compare_with_hint(ctx, ref, srv.uri(), "reference vs export (over NBD)")

    status = holes_in(srv.uri(), UNMAP_HOLES)
    if expect_holes:
        for off, length, extents in status:
            covered = sum(n for n, _ in extents)
            check(covered > 0 and all(flags & nbd.STATE_HOLE for _, flags in extents),
                  "expected [%d, +%d) to be a hole (base:allocation flag 1)"
                  " after zero-with-unmap / discard / zero data with"
                  " --discard=unmap --detect-zeroes=unmap; block status says"
                  " %r" % (off, length, extents))
    else:
        note("block status of the unmap test ranges without unmap options: %r"
             % [(o, l, e) for o, l, e in status])

    srv.stop()
    compare_with_hint(ctx, ref, img, "reference vs image file after stop")


def require_odirect(ctx):
    """Fails with a clear message where the test directory cannot do O_DIRECT."""
    probe = ctx.path("odirect-probe")
    open(probe, "wb").close()
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
    except OSError as e:
        fail("the filesystem of %s does not support O_DIRECT (%s); this case"
             " needs /tmp on a disk filesystem (e.g. ext4), not tmpfs"
             % (ctx.tmpdir, e))


@case
def qemu_io_compare(ctx):
    """A scripted qemu-io sequence (pattern writes, unaligned writes, FUA,
    write -z, write -z -u, discard, flush) through the export gives the same
    bytes as the same sequence on a local raw file.  Default options:
    --discard=ignore, so discard keeps the data (reference run uses
    `qemu-io -d ignore`)."""
    run_qemu_io_compare(ctx, {}, "ignore", expect_holes=False)


@case
def qemu_io_compare_unmap(ctx):
    """Same sequence with --discard=unmap --detect-zeroes=unmap: discard
    and zero-with-unmap punch holes (reference uses `qemu-io -d unmap`), and
    written zero data becomes a hole; afterwards base:allocation reports
    those ranges as holes."""
    run_qemu_io_compare(ctx, {"discard": "unmap", "detect_zeroes": "unmap"},
                        "unmap", expect_holes=True)


@case
def qemu_io_compare_direct(ctx):
    """Same sequence with --cache=none --aio=native (O_DIRECT + Linux AIO):
    unaligned requests still work and give the same bytes."""
    require_odirect(ctx)
    run_qemu_io_compare(ctx, {"nocache_native": True}, "ignore",
                        expect_holes=False)


@case
def qemu_io_compare_io_uring(ctx):
    """Same sequence with --aio=io_uring (qemu-nbd's option): buffered I/O
    through the io_uring gives the same bytes."""
    run_qemu_io_compare(ctx, {"extra": ("--aio=io_uring",)}, "ignore",
                        expect_holes=False)


@case
def qemu_io_compare_direct_io_uring(ctx):
    """Same sequence with --cache=none --aio=io_uring: O_DIRECT through the
    io_uring, unaligned requests padded, the same bytes."""
    require_odirect(ctx)
    run_qemu_io_compare(ctx, {"extra": ("--cache=none", "--aio=io_uring")},
                        "ignore", expect_holes=False)


@case
def qemu_io_compare_writethrough(ctx):
    """Same sequence with --cache=writethrough (every write forced to disk
    before its reply, as FUA): the same bytes."""
    run_qemu_io_compare(ctx, {"extra": ("--cache=writethrough",)}, "ignore",
                        expect_holes=False)


@case
def qemu_io_compare_directsync(ctx):
    """Same sequence with --cache=directsync (O_DIRECT and every write
    forced to disk): the same bytes."""
    require_odirect(ctx)
    run_qemu_io_compare(ctx, {"extra": ("--cache=directsync",)}, "ignore",
                        expect_holes=False)


@case
def qemu_io_compare_unsafe(ctx):
    """Same sequence with --cache=unsafe (flushes ignored): the same bytes
    while the server runs."""
    run_qemu_io_compare(ctx, {"extra": ("--cache=unsafe",)}, "ignore",
                        expect_holes=False)


@case
def block_device(ctx):
    """A block device (a loop device over a file) is served like a file:
    its size comes from the device, and writes, zeroes and reads round-trip
    with and without O_DIRECT.  Needs root and a free loop device; where
    there is none the case says so and checks nothing."""
    backing = ctx.path("loop-backing.img")
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    res = ctx.run(["losetup", "-f", "--show", backing], check=False)
    if res.returncode != 0:
        note("no loop device here (%s): block devices not tried" % res.err.strip())
        return
    dev = res.out.strip()
    try:
        for extra in ((), ("--cache=none", "--aio=native")):
            srv = ctx.start_server(dev, fmt="raw", extra=list(extra))
            info = ctx.run(["nbdinfo", "--size", srv.uri()])
            check_eq("export size of %s %s" % (dev, " ".join(extra)), str(64 * MiB), info.out.strip())
            out = ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 1M 1M", "-c", "write -P 0x45 3M 1000",
                           "-c", "write -z 4M 1M", "-c", "read -P 0x44 1M 1M", "-c", "read -P 0x45 3M 1000",
                           "-c", "read -P 0 4M 1M", "-c", "flush", srv.uri()]).out
            check("fail" not in out and "Pattern verification" not in out, "qemu-io on %s: %s" % (dev, out[-500:]))
            srv.stop()
        local = ctx.run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 1M 1M", dev]).out
        check("Pattern verification" not in local, "the device holds what was written: %s" % local[-300:])
    finally:
        ctx.run(["losetup", "-d", dev], check=False)


@case
def direct_large_reads(ctx):
    """--cache=none --aio=native reads longer than 254 pages (the size a
    block device splits when the buffer is scattered 4 KiB pages; Strata
    reads those into 2 MiB huge-page buffers): 1 MiB, 2 MiB, odd lengths
    and offsets, and 48 reads of 1 MiB in flight at once (more than the
    buffers set aside, so some use ordinary memory) all return the file's
    bytes."""
    require_odirect(ctx)
    size = 64 * MiB
    img = ctx.path("direct.raw")
    data = pattern(77, size)
    with open(img, "wb") as f:
        f.write(data)
    srv = ctx.start_server(img, nocache_native=True)
    h = nbd.NBD()
    h.connect_unix(srv.sock)
    for offset, length in ((0, 1 * MiB), (3 * MiB, 2 * MiB), (5 * MiB + 512, 1 * MiB + 4096),
                           (7 * MiB + 17, 1016 * KiB + 1), (9 * MiB - 3, 2 * MiB - 5),
                           (12 * MiB, 2 * MiB + 4096)):
        check_bytes("read [%d, +%d)" % (offset, length), data[offset:offset + length],
                    h.pread(length, offset))
    buffers = []
    for i in range(48):
        buf = nbd.Buffer(1 * MiB)
        h.aio_pread(buf, i * MiB + (i % 3) * 4096)
        buffers.append((i * MiB + (i % 3) * 4096, buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for offset, buf in buffers:
        check_bytes("concurrent read at %d" % offset, data[offset:offset + MiB], buf.to_bytearray())
    h.shutdown()
    srv.stop()


@case
def qemu_io_compare_direct_tuned(ctx):
    """The O_DIRECT sequence again with Strata's loop polling on and Linux
    AIO batches of up to 8 (--poll-max-ns=50000 --aio-max-batch=8): the
    same bytes.  These options are Strata's own, so against another server
    (--server-cmd) the case checks nothing and says so."""
    if "strata" not in os.path.basename(Options.server_cmd[0]):
        note("not a Strata server: --poll-max-ns/--aio-max-batch not tried")
        return
    require_odirect(ctx)
    run_qemu_io_compare(ctx, {"nocache_native": True,
                              "extra": ("--poll-max-ns=50000", "--aio-max-batch=8")},
                        "ignore", expect_holes=False)
