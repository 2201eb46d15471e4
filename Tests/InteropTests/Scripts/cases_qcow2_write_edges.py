"""qcow2 writer conformance at the edges real images reach: compressed
clusters that straddle host clusters, a dirty lazy-refcounts image whose
refcounts really are wrong, every refcount width, 2 MiB clusters, a backing
file that ends in the middle of a cluster, clients writing over each other,
an L2 cache far smaller than the image, and a relative backing name looked
up from another working directory. Each ends in `qemu-img check` and a
byte comparison with what qemu-io makes of the same writes."""

import errno
import json
import os
import random
import signal
import time

import nbd

from common import MiB, case, case_timeout, check, check_eq, fail, note
from cases_qcow2 import check_served, qimg, qio
from cases_qcow2_write import extension_types, image_bytes, run_clients, unexpected_sectors, writer_check


def _mixed_data(size, seed):
    """Clusters of random bytes (stored uncompressed by `convert -c`), of
    words (compressing 3-5x), of half words half random, and of zeros, so
    compressed clusters have many different lengths and pack across host
    cluster boundaries."""
    rng = random.Random(seed)
    words = [b"qcow2", b"cluster", b"backing", b"refcount", b"the ", b"of ", b"L2 ", b"\n"]
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(4)
        if kind == 0:
            chunk = rng.randbytes(65536)
        elif kind == 1:
            chunk = b"".join(rng.choice(words) for _ in range(16000))[:65536]
        elif kind == 2:
            text = b"".join(rng.choice(words) for _ in range(8000))[:32768]
            chunk = text + rng.randbytes(65536 - len(text))
        else:
            chunk = bytes(65536)
        out += chunk.ljust(65536, b"\0")
    return bytes(out[:size])


def _compressed_spans(path):
    """(host offset, length) of every compressed cluster of a qcow2 file
    whose L1/L2 tables use standard 64-bit entries."""
    with open(path, "rb") as f:
        data = f.read()
    cluster_bits = int.from_bytes(data[20:24], "big")
    cluster_size = 1 << cluster_bits
    l1_size = int.from_bytes(data[36:40], "big")
    l1_offset = int.from_bytes(data[40:48], "big")
    shift = 62 - (cluster_bits - 8)
    spans = []
    for i in range(l1_size):
        l2 = int.from_bytes(data[l1_offset + 8 * i:l1_offset + 8 * i + 8], "big") & 0x00fffffffffffe00
        if l2 == 0:
            continue
        for j in range(cluster_size // 8):
            entry = int.from_bytes(data[l2 + 8 * j:l2 + 8 * j + 8], "big")
            if not entry & (1 << 62):
                continue
            offset = entry & ((1 << shift) - 1)
            sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
            end = (offset & ~511) + sectors * 512
            spans.append((offset, end - offset))
    return cluster_size, spans


@case
def qcow2_compressed_mixed_data(ctx):
    """`qemu-img convert -c` (zlib, and zstd) of mixed data, as cloud
    images are made: compressed clusters of many lengths, some crossing a
    host cluster boundary, read back as qemu-img reads them, then partly
    overwritten."""
    raw = ctx.path("mixed.raw")
    with open(raw, "wb") as f:
        f.write(_mixed_data(16 * MiB, seed=7))
    for kind in ["zlib", "zstd"]:
        img = ctx.path("mixed-%s.qcow2" % kind)
        qimg(ctx, "convert", "-c", "-O", "qcow2", "-o", "compression_type=" + kind, raw, img)
        cluster_size, spans = _compressed_spans(img)
        crossing = [s for s in spans if s[0] // cluster_size != (s[0] + s[1] - 1) // cluster_size]
        note("%s: %d compressed clusters, %d crossing a host cluster boundary" % (kind, len(spans), len(crossing)))
        check(len(crossing) >= 3, "%s: some compressed clusters cross a host cluster boundary" % kind)
        check_served(ctx, img)
        writer_check(ctx, img, writes=[
            "write -P 0x31 100 5000",
            "write -P 0x32 1M 64k",
            "write -P 0x33 %d 70000" % (3 * MiB - 1000),
            "write -z 5M 64k",
            "write -z 6M 3000",
            "write -P 0x34 %d 4096" % (9 * MiB + 60000),
            "flush",
        ])


@case
def qcow2_lazy_refcounts_repaired_before_writing(ctx):
    """A dirty lazy-refcounts image whose refcounts were lost (every cluster
    past the first four counted 0, as after a crash before the refcount
    blocks were written): served read-write it is repaired before the first
    allocation, so new clusters never land on the old data."""
    img = ctx.path("lazy.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    qio(ctx, img, "write -P 0x61 0 1M", "write -P 0x62 4M 128k", "write -P 0x63 9M 64k")
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        incompatible = int.from_bytes(head[72:80], "big") | 1  # the dirty bit
        head[72:80] = incompatible.to_bytes(8, "big")
        table = int.from_bytes(head[48:56], "big")
        f.seek(0)
        f.write(head)
        f.seek(table)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 4 * 2)  # 16-bit refcounts; keep header, table, block, L1
        f.write(bytes(65536 - 8))
    lost = ctx.run(["qemu-img", "check", img], check=False)
    check_eq("qemu-img check before the repair (refcounts lost)", 2, lost.returncode)
    writer_check(ctx, img)


@case
def qcow2_write_refcount_widths(ctx):
    """Writing at every refcount width from 1 to 64 bits: refcount blocks
    of each entry size, allocated and updated as qemu-img expects."""
    for bits in ["1", "2", "4", "8", "16", "32", "64"]:
        img = ctx.path("w%s.qcow2" % bits)
        qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=" + bits, img, "16M")
        writer_check(ctx, img, writes=["write -P 0x41 0 3M", "write -P 0x42 10M 1M", "write -P 0x43 12345 6789",
                                       "write -z 1M 64k", "write -z -u 2M 128k", "write -P 0x44 2M 4k", "flush"])


@case
def qcow2_write_2m_clusters(ctx):
    """2 MiB clusters, alone and over a backing file with 64 KiB clusters:
    COW of up to 2 MiB around a small write."""
    img = ctx.path("big.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=2M", img, "32M")
    writer_check(ctx, img)
    base = ctx.path("big-base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "32M")
    qio(ctx, base, "write -P 0x71 0 32M")
    top = ctx.path("big-top.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=2M", "-b", base, "-F", "qcow2", top)
    writer_check(ctx, top)


@case
def qcow2_write_across_a_short_backing_end(ctx):
    """Backing files that end inside an overlay cluster: a raw file of an
    odd length, and a qcow2 of a size that is not a whole cluster. Writes
    across the end copy the backing data before it and zeros after it."""
    raw = ctx.path("odd.raw")
    end = 5 * MiB + 1234
    with open(raw, "wb") as f:
        f.write(bytes([0x5b]) * end)
    base = ctx.path("odd.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, str(5 * MiB + 3 * 512))
    qio(ctx, base, "write -P 0x5c 0 %d" % (5 * MiB + 3 * 512))
    writes = ["write -P 0x11 %d 100" % (end - 50), "write -P 0x12 %d 4096" % (5 * MiB - 70000),
              "write -P 0x14 %d 1000" % (5 * MiB + 1000),
              "write -z %d 512" % (5 * MiB + 1024), "write -P 0x13 %d 1000" % (5 * MiB + 65536 + 10), "flush"]
    for backing, fmt, options in [(raw, "raw", ""), (base, "qcow2", ""), (raw, "raw", "extended_l2=on,"),
                                  (base, "qcow2", "cluster_size=2M,")]:
        top = ctx.path("over-odd.qcow2")
        if os.path.exists(top):
            os.unlink(top)
        qimg(ctx, "create", "-f", "qcow2", "-o", options + "compat=1.1", "-b", backing, "-F", fmt, top, "8M")
        note("overlay (%s) over %s" % (options or "64k clusters,", os.path.basename(backing)))
        writer_check(ctx, top, writes=writes)


def _sector_owners(plan, size):
    """For each 512-byte sector, the set of client values written there."""
    owners = [set() for _ in range(size // 512)]
    for n, writes in plan.items():
        for offset, length in writes:
            for s in range(offset // 512, (offset + length) // 512):
                owners[s].add(n + 1)
    return owners


@case
def qcow2_write_concurrent_overlapping(ctx):
    """Eight clients write overlapping runs of sectors into the same
    unallocated clusters at once, each with its own byte: afterwards every
    sector holds whole the byte of one client that wrote it (never the
    backing data a concurrent copy-on-write brought back, never a mix), and
    the image checks clean. Over a backing file, with subclusters, and
    with 4 KiB clusters and no backing file."""
    size = 8 * MiB
    base = ctx.path("ov-base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, str(size))
    qio(ctx, base, "write -P 0x61 0 %d" % size)
    plan = {}
    for n in range(8):
        rng = random.Random(500 + n)
        writes = []
        for _ in range(150):
            length = rng.choice([512, 1536, 4096, 8192, 20480, 70144])
            writes.append((rng.randrange(0, (size - length) // 512) * 512, length))
        plan[n] = writes
    owners = _sector_owners(plan, size)

    def work(n, h):
        for i, (offset, length) in enumerate(plan[n]):
            h.aio_pwrite(bytes([n + 1]) * length, offset)
            while h.aio_in_flight() >= 16:
                h.poll(-1)
        while h.aio_in_flight() > 0:
            h.poll(-1)

    for options, backing in [("", base), ("extended_l2=on,", base), ("cluster_size=4k,", None)]:
        img = ctx.path("ov.qcow2")
        if os.path.exists(img):
            os.unlink(img)
        qimg(ctx, "create", "-f", "qcow2", "-o", options + "compat=1.1", *(["-b", base, "-F", "qcow2"] if backing else []),
             img, str(size))
        srv = ctx.start_server(img, fmt="qcow2", extra=["-e", "8"])
        run_clients(srv, range(8), work)
        srv.stop()
        check_eq("qemu-img check exit status (%s)" % (options or "64k clusters"), 0,
                 ctx.run(["qemu-img", "check", img], check=False).returncode)
        data = image_bytes(ctx, img, "ov.raw")
        untouched = 0x61 if backing else 0
        for s, who in enumerate(owners):
            sector = data[s * 512:(s + 1) * 512]
            value = sector[0]
            if sector.count(value) != 512 or value not in (who or {untouched}):
                fail("%s: sector %d (offset %d) reads %r..., expected one whole byte of %s"
                     % (options or "64k clusters", s, s * 512, sector[:16], sorted(who) or [untouched]))


@case
def qcow2_write_with_a_tiny_l2_cache(ctx):
    """An L2 cache of two tables (--l2-cache-size) over images with many:
    512-byte clusters (256 tables for 8 MiB) and a 4 GiB image of 64 KiB
    clusters written in eight places 512 MiB apart. Tables are evicted,
    written back and read again; every read through the export checks its
    pattern."""
    small = ctx.path("tiny-cache.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=512", small, "8M")
    writes, checks = [], []
    for i in range(40):
        offset = (i * 2654435761) % (8 * MiB - 8192) // 512 * 512
        writes.append("write -P 0x%02x %d 3000" % (0x20 + i, offset))
        checks.append("read -P 0x%02x %d 3000" % (0x20 + i, offset))
    # Reads of the later writes only: earlier ones may be overwritten.
    writer_check(ctx, small, writes=writes + checks[-8:] + ["flush"], extra=["--l2-cache-size=1k"])
    big = ctx.path("big-l1.qcow2")
    qimg(ctx, "create", "-f", "qcow2", big, "4G")
    spots = [i * 512 * MiB + 4096 * i for i in range(8)]
    writes = ["write -P 0x%02x %d 70000" % (0x50 + i, spot) for i, spot in enumerate(spots)]
    reads = ["read -P 0x%02x %d 70000" % (0x50 + i, spot) for i, spot in enumerate(spots)]
    writer_check(ctx, big, writes=writes + reads + ["flush"], extra=["--l2-cache-size=128k"])


@case
def qcow2_relative_backing_found_from_another_directory(ctx):
    """Relative backing names resolve against the overlay's directory, not
    the server's working directory: the chain lives in a subdirectory."""
    sub = ctx.path("images")
    os.mkdir(sub)
    base = os.path.join(sub, "base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "8M")
    qio(ctx, base, "write -P 0x7a 0 8M")
    top = os.path.join(sub, "top.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qio(ctx, top, "write -P 0x7b 1M 64k")
    check(not os.path.exists(ctx.path("base.qcow2")), "no base.qcow2 in the server's working directory")
    check_served(ctx, top)
    writer_check(ctx, top, writes=["write -P 0x7c 3M 4096", "write -z 5M 64k", "flush"])


@case
def qcow2_snapshot_served_read_only(ctx):
    """-l without -r serves the snapshot read-only, as qemu-nbd -l does: the
    export says so and a write is refused; the image is unchanged."""
    img = ctx.path("snap.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    qio(ctx, img, "write -P 0x2a 0 1M")
    qimg(ctx, "snapshot", "-c", "one", img)
    with open(img, "rb") as f:
        before = f.read()
    srv = ctx.start_server(img, fmt="qcow2", extra=["-l", "one"])
    h = nbd.NBD()
    # Not strict: libnbd sends the write, so the server must refuse it.
    h.set_strict_mode(0)
    h.connect_uri(srv.uri())
    check(h.is_read_only(), "the export of a snapshot is read-only")
    try:
        h.pwrite(b"x" * 512, 0)
        fail("a write to the snapshot export succeeded")
    except nbd.Error as e:
        check_eq("the server's refusal", errno.EPERM, e.errnum)
    h.shutdown()
    srv.stop()
    with open(img, "rb") as f:
        check(f.read() == before, "the image is unchanged")


@case_timeout(240)
@case
def qcow2_refcount_table_growth_keeps_unknowns(ctx):
    """Growing the refcount table rewrites where the header points: an
    unknown header extension and compatible bit survive it, and so does
    the backing file name."""
    base = ctx.path("g-base.raw")
    qimg(ctx, "create", "-f", "raw", base, "8M")
    img = ctx.path("g.qcow2")
    # 512-byte clusters of 64-bit refcounts: one table cluster covers 2 MiB.
    qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "-b", base, "-F", "raw", img)
    with open(img, "r+b") as f:
        head = bytearray(f.read(512))
        compatible = int.from_bytes(head[80:88], "big") | (1 << 41)
        head[80:88] = compatible.to_bytes(8, "big")
        length = int.from_bytes(head[100:104], "big")
        ext = (0x5EED5EED).to_bytes(4, "big") + (6).to_bytes(4, "big") + b"strata\0\0"
        head[length:length] = ext
        backing_at = int.from_bytes(head[8:16], "big") + len(ext)
        head[8:16] = backing_at.to_bytes(8, "big")
        check(backing_at + int.from_bytes(head[16:20], "big") <= 512, "the header still fits its cluster")
        f.seek(0)
        f.write(bytes(head[:512]))
    before = extension_types(img)
    info_before = json.loads(ctx.run(["qemu-img", "info", "--output=json", img]).out)
    writer_check(ctx, img, writes=["write -P 0x66 0 3M", "flush"], timeout=120)
    with open(img, "rb") as f:
        head = f.read(512)
    check(int.from_bytes(head[56:60], "big") > 1, "the refcount table grew past one cluster")
    check(int.from_bytes(head[80:88], "big") & (1 << 41), "the unknown compatible bit survived")
    check_eq("header extensions after the refcount table grew", before, extension_types(img))
    check(b"strata" in head, "the unknown extension's data survived")
    info = json.loads(ctx.run(["qemu-img", "info", "--output=json", img]).out)
    check_eq("backing file", info_before.get("backing-filename"), info.get("backing-filename"))


@case
def qcow2_data_file_over_backing(ctx):
    """An external data file under an overlay of a backing file (qemu-img
    makes these; only data_file_raw excludes a backing file): unallocated
    clusters read from the backing file, and a partial write copies the
    rest of its cluster from there into the data file."""
    base = ctx.path("dfb-base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "16M")
    qio(ctx, base, "write -P 0x3d 0 16M")
    top = ctx.path("dfb.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "data_file=" + ctx.path("dfb.data"), top)
    qio(ctx, top, "write -P 0x3e 1M 64k", "write -z 2M 64k")
    check_served(ctx, top)
    writer_check(ctx, top)


def _pipelined_storm(srv, rng, writes, size, seconds):
    """Writes 32 at a time into 64 KiB slots (never two in flight in one
    slot, so writes that overlap are ordered), with a FLUSH now and then,
    until the server is killed `seconds` in. Appends [offset, length,
    value, durable] to `writes` in issue order; a write is durable once a
    FLUSH issued after its reply has completed."""
    h = nbd.NBD()
    h.connect_uri(srv.uri())
    in_flight, busy, replied = {}, set(), []
    flush, covered = None, []
    kill_at, killed = time.time() + seconds, False
    try:
        while True:
            while len(in_flight) < 32:
                slot = rng.randrange(0, size // 65536)
                if slot in busy:
                    continue
                start = rng.randrange(0, 128) * 512
                length = min(rng.choice([512, 4096, 20480, 65536]), 65536 - start)
                value = rng.randrange(1, 256)
                cookie = h.aio_pwrite(bytes([value]) * length, slot * 65536 + start)
                in_flight[cookie] = (len(writes), slot)
                busy.add(slot)
                writes.append([slot * 65536 + start, length, value, False])
            if flush is None and rng.random() < 0.05:
                flush, covered, replied = h.aio_flush(), replied, []
            if not killed and time.time() > kill_at:
                os.kill(srv.proc.pid, signal.SIGKILL)
                killed = True
            h.poll(-1)
            for cookie in [c for c in in_flight if h.aio_command_completed(c)]:
                index, slot = in_flight.pop(cookie)
                busy.discard(slot)
                replied.append(index)
            if flush is not None and h.aio_command_completed(flush):
                for index in covered:
                    writes[index][3] = True
                flush = None
    except nbd.Error:
        pass


@case_timeout(240)
@case
def qcow2_crash_kill9_pipelined(ctx):
    """kill -9 with 32 writes in flight, three times over the same image:
    an overlay of a backing file (every partial write copies the rest of its
    cluster), with and without lazy refcounts. After each kill qemu-img
    check finds no corruption (leaks are allowed), and every write a
    completed FLUSH covered reads back."""
    size = 32 * MiB
    base = ctx.path("storm-base.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, str(size))
    qio(ctx, base, "write -P 0x61 0 %d" % size)
    for lazy in ["off", "on"]:
        img = ctx.path("storm-%s.qcow2" % lazy)
        qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=" + lazy, "-b", base, "-F", "qcow2", img)
        rng = random.Random(11)
        # What the image holds before the round: after a kill, what it read
        # back, which must then stay as it is until written again.
        before = bytearray(b"\x61") * size
        for round_ in range(3):
            writes = []
            srv = ctx.start_server(img, fmt="qcow2")
            _pipelined_storm(srv, rng, writes, size, seconds=1.0 + round_ * 0.5)
            check(srv.wait_exit(10) is not None, "the server was killed")
            res = ctx.run(["qemu-img", "check", img], check=False)
            check(res.returncode in (0, 3),
                  "lazy_refcounts=%s, kill %d: qemu-img check exit %d (%s)" % (lazy, round_ + 1, res.returncode,
                                                                               res.out[-400:]))
            data = image_bytes(ctx, img, "storm.raw")
            wrong = unexpected_sectors(data, writes, before)
            durable = sum(1 for w in writes if w[3])
            note("lazy_refcounts=%s, kill %d: check exit %d, %d of %d writes durable"
                 % (lazy, round_ + 1, res.returncode, durable, len(writes)))
            check(durable > 0, "some writes were made durable before the kill")
            check(not wrong, "sectors that a completed FLUSH covered, or that no write touched, read back wrong;"
                  " first at offsets %s" % ", ".join(str(i) for i in wrong[:5]))
            before = bytearray(data)


@case
def qcow2_hostile_refcounts_served_read_write(ctx):
    """Refcount structures a hostile image can have, served read-write:
    a table past the end of the file or over the header, a table size past
    any file, a refcount block over the L1 table or at an unaligned offset.
    Each is refused with a message naming it, or the server goes on without
    writing over metadata; never a crash. A real LUKS-encrypted qcow2 made
    by qemu-img is refused as not supported."""
    good = ctx.path("rc-good.qcow2")
    qimg(ctx, "create", "-f", "qcow2", good, "16M")
    qio(ctx, good, "write -P 0x11 0 128k")
    with open(good, "rb") as f:
        original = bytearray(f.read())
    table = int.from_bytes(original[48:56], "big")
    l1 = int.from_bytes(original[40:48], "big")

    def put(data, offset, value, size):
        data[offset:offset + size] = value.to_bytes(size, "big")

    variants = {
        "table past the end": lambda d: put(d, 48, 1 << 40, 8),
        "table over the header": lambda d: put(d, 48, 0, 8),
        "table of 2^32 clusters": lambda d: put(d, 56, 0xffffffff, 4),
        "block over the L1 table": lambda d: put(d, table, l1, 8),
        "unaligned block": lambda d: put(d, table, 0x20000 + 512, 8),
    }
    for name, damage in variants.items():
        data = bytearray(original)
        damage(data)
        img = ctx.path("rc-damaged.qcow2")
        with open(img, "wb") as f:
            f.write(data)
        srv = ctx.start_server(img, fmt="qcow2", wait=False)
        status = srv.wait_exit(2)
        text = srv.stderr_text()
        check("Fatal error" not in text and (status is None or status > 0),
              "%s: refused or served, no crash (exit %s): %s" % (name, status, text[-300:]))
        if status is None:
            # It opened: a write must not land on metadata.
            srv.wait_ready()
            res = ctx.run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k", srv.uri()], check=False)
            srv.stop()
            check(srv.proc.returncode is not None and srv.proc.returncode >= 0,
                  "%s: the server ended by itself, not by a signal" % name)
            with open(img, "rb") as f:
                after = f.read()
            check(after[l1:l1 + 512] == data[l1:l1 + 512] and after[:48] == data[:48],
                  "%s: the header and L1 table are as they were" % name)
            note("%s: served; a write: %s" % (name, (res.out + res.err).strip().splitlines()[-1:]))
        else:
            check("strata:" in text and len(text.strip()) > len("strata:"), "%s: a message: %s" % (name, text))
            note("%s: %s" % (name, text.strip().splitlines()[-1]))
    luks = ctx.path("luks.qcow2")
    # qemu-img times its key derivation with the thread's CPU clock, which on
    # a busy VM now and then reads as no time ("Unable to get accurate CPU
    # usage"): a few tries, and without an image no LUKS part.
    for _ in range(3):
        made = ctx.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=strata-test",
                        "-o", "encrypt.format=luks,encrypt.key-secret=sec0", luks, "16M"], check=False)
        if made.returncode == 0:
            break
    if made.returncode != 0:
        note("qemu-img could not make a LUKS image here, so that part is left out: %s" % made.err.strip())
        return
    for readonly in (True, False):
        srv = ctx.start_server(luks, fmt="qcow2", readonly=readonly, wait=False)
        status = srv.wait_exit(20)
        text = srv.stderr_text()
        check(status is not None and status > 0 and "not supported" in text,
              "a LUKS image is refused as not supported (exit %s): %s" % (status, text[-300:]))
