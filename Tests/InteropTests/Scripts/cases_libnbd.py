"""Cases driven through python3-libnbd: every transmission command with its
flags, error answers, read-only exports and concurrent clients."""

import errno
import threading

import nbd

import nbdraw
from common import (KiB, MiB, STD_EXTENTS, STD_SIZE, case, check, check_bytes,
                    check_eq, check_errno, errno_name, expected_map, fail,
                    make_sparse_image, merge_extents, note, pattern,
                    sha256_file)

EPERM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = (
    errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW, errno.ENOTSUP)

# qemu-nbd 7.2 answers EINVAL where the spec wants EPERM (see interop.py).
QUIRK_EPERM = ("QEMU-EPERM", EINVAL)


def connect(sock, structured=True, meta=True, strict=None):
    h = nbd.NBD()
    if strict is not None:
        h.set_strict_mode(strict)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    return h


def block_status_all(h, length, offset, flags=0):
    """base:allocation extents [(offset, length, flags)] from one call."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for n, fl in zip(entries[0::2], entries[1::2]):
                out.append((pos, n, fl))
                pos += n
        return 0
    h.block_status(length, offset, cb, flags)
    return out


def full_map(h, size):
    """Walk the whole export with block status (servers may answer short)."""
    extents = []
    pos = 0
    while pos < size:
        got = block_status_all(h, min(size - pos, 1 << 30), pos)
        check(got, "block status at offset %d returned no extent" % pos)
        for off, n, fl in got:
            check(n > 0, "block status returned a zero-length extent at %d" % off)
            n = min(n, size - off)  # the last extent may overshoot the end
            extents.append((off, n, fl))
        pos = extents[-1][0] + extents[-1][1]
    return extents


def read_chunks(h, count, offset, flags=0):
    """pread_structured; returns (data, [(status, offset, length)])."""
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((status, off, len(subbuf)))
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    return bytes(data), chunks


STATUS_NAMES = {nbd.READ_DATA: "READ_DATA", nbd.READ_HOLE: "READ_HOLE",
                nbd.READ_ERROR: "READ_ERROR"}


def named_chunks(chunks):
    return [(STATUS_NAMES.get(s, s), o, n) for s, o, n in chunks]


# ---------------------------------------------------------------------------

@case
def libnbd_commands(ctx):
    """Every command through libnbd, with structured replies on and off:
    aligned/unaligned pread+pwrite round trips, FUA writes, flush, trim
    (+FUA), write-zeroes (plain, NO_HOLE, FAST_ZERO), cache; with structured
    replies also block status (full walk, REQ_ONE gives exactly one extent),
    pread_structured hole/data chunks and DF (one content chunk).  A local
    model of the image is kept and compared with the export and, at the end,
    with the image file."""
    img = ctx.path("disk.raw")
    model = bytearray(make_sparse_image(img, STD_SIZE, STD_EXTENTS))
    srv = ctx.start_server(img)

    def verify(h, off, length, what):
        check_bytes("%s: pread(%d, %d)" % (what, length, off),
                    model[off:off + length], h.pread(length, off))

    for structured in (True, False):
        tag = "structured replies %s" % ("on" if structured else "off")
        h = connect(srv.sock, structured=structured, meta=structured)
        check_eq(tag + ": structured replies negotiated", structured,
                 h.get_structured_replies_negotiated())
        check_eq(tag + ": size", STD_SIZE, h.get_size())
        for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache"):
            check_eq("%s: %s()" % (tag, name), True, getattr(h, name)())
        check(not h.is_read_only(), tag + ": export is read-only")
        if not structured:
            # Spec: NBD_FLAG_SEND_DF MUST be clear without structured replies.
            check_eq(tag + ": can_df()", False, h.can_df())
        seed = 100 if structured else 200

        # -- block status, before anything is written (first pass only) ----
        if structured:
            check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
                  "base:allocation was not negotiated")
            want = expected_map(STD_SIZE, STD_EXTENTS)
            check_eq("block status walk of the whole image (merged)", want,
                     merge_extents([(o, n, fl & 3) for o, n, fl in
                                    full_map(h, STD_SIZE)]))
            for off, typ in ((0, 0), (256 * KiB, 3), (3 * MiB + 4 * KiB, 0),
                             (7 * MiB, 3)):
                got = block_status_all(h, min(4 * MiB, STD_SIZE - off), off,
                                       nbd.CMD_FLAG_REQ_ONE)
                check_eq("number of extents for block status REQ_ONE at %d"
                         % off, 1, len(got))
                check(0 < got[0][1] <= 4 * MiB,
                      "REQ_ONE extent length %d not in (0, 4 MiB]" % got[0][1])
                check_eq("REQ_ONE extent type at %d" % off, typ, got[0][2] & 3)

            # pread_structured: hole region -> hole chunk(s), data -> data.
            data, chunks = read_chunks(h, 64 * KiB, 7 * MiB)
            check_bytes("pread_structured of a hole", bytes(64 * KiB), data)
            check(any(s == nbd.READ_HOLE for s, _, _ in chunks),
                  "expected a READ_HOLE chunk for the hole at 7 MiB, got %r"
                  % named_chunks(chunks))
            check_eq("bytes covered by chunks (hole)", 64 * KiB,
                     sum(n for _, _, n in chunks))
            data, chunks = read_chunks(h, 128 * KiB, 3 * MiB)
            check_bytes("pread_structured of data", model[3 * MiB:3 * MiB + 128 * KiB], data)
            check(chunks and all(s == nbd.READ_DATA for s, _, _ in chunks),
                  "expected only READ_DATA chunks for data at 3 MiB, got %r"
                  % named_chunks(chunks))
            check_eq("bytes covered by chunks (data)", 128 * KiB,
                     sum(n for _, _, n in chunks))
            # DF over a data/hole boundary: exactly one content chunk.
            if h.can_df():
                data, chunks = read_chunks(h, 64 * KiB, 160 * KiB, nbd.CMD_FLAG_DF)
                check_bytes("pread with DF across data/hole",
                            model[160 * KiB:224 * KiB], data)
                check_eq("chunks for a DF read across data/hole",
                         [("READ_DATA", 160 * KiB, 64 * KiB)], named_chunks(chunks))
                # libnbd 1.14 refuses DF on plain pread unless strict mode
                # is off.
                strict = h.get_strict_mode()
                h.set_strict_mode(0)
                check_bytes("pread(DF)", model[4096:8192],
                            h.pread(4096, 4096, nbd.CMD_FLAG_DF))
                h.set_strict_mode(strict)
            else:
                note("server does not advertise NBD_FLAG_SEND_DF")
        else:
            data, chunks = read_chunks(h, 64 * KiB, 7 * MiB)
            check_bytes("pread_structured of a hole (simple reply)", bytes(64 * KiB), data)
            check_eq("chunks for a simple-reply read",
                     [("READ_DATA", 7 * MiB, 64 * KiB)], named_chunks(chunks))

        # -- reads at aligned and unaligned offsets ----------------------
        for off, length in ((0, 64 * KiB), (1 * MiB, 4096), (513, 1000),
                            (192 * KiB - 7, 14), (STD_SIZE - 100, 100),
                            (3 * MiB - 3, 512 * KiB + 6), (STD_SIZE - 1, 1)):
            verify(h, off, length, tag)

        # -- writes -------------------------------------------------------
        writes = [(2 * MiB, 128 * KiB, 0), (513, 1000, 0),
                  (1 * MiB + 4095, 777, 0), (4 * MiB, 4096, nbd.CMD_FLAG_FUA),
                  (5 * MiB + 1, 65535, nbd.CMD_FLAG_FUA),
                  (STD_SIZE - 300, 300, 0)]
        for i, (off, length, flags) in enumerate(writes):
            buf = pattern(seed + i, length)
            h.pwrite(buf, off, flags)
            model[off:off + length] = buf
            verify(h, off, length, "%s: after pwrite(%d, %d, flags=%d)"
                   % (tag, length, off, flags))
        h.flush()

        # -- write-zeroes -------------------------------------------------
        for off, length, flags in ((2 * MiB + 16 * KiB, 32 * KiB, 0),
                                   (2 * MiB + 70001, 3000, nbd.CMD_FLAG_NO_HOLE),
                                   (1 * MiB + 100, 300, 0),
                                   (4 * MiB, 4096, nbd.CMD_FLAG_FUA)):
            h.zero(length, off, flags)
            model[off:off + length] = bytes(length)
            verify(h, off - 100, length + 200, "%s: after zero(%d, %d, flags=%d)"
                   % (tag, length, off, flags))
        if h.can_fast_zero():
            off, length = 2 * MiB + 64 * KiB, 64 * KiB
            try:
                h.zero(length, off, nbd.CMD_FLAG_FAST_ZERO)
            except nbd.Error as e:
                check_errno(tag + ": errno of a failed FAST_ZERO", (ENOTSUP,), e.errnum)
                note(tag + ": FAST_ZERO refused with ENOTSUP")
            else:
                model[off:off + length] = bytes(length)
                verify(h, off, length, tag + ": after zero(FAST_ZERO)")
        else:
            note(tag + ": server does not advertise fast zero")

        # -- trim (contents afterwards are unspecified: rewrite them) -----
        for i, flags in enumerate((0, nbd.CMD_FLAG_FUA)):
            off, length = 3 * MiB + i * 64 * KiB, 64 * KiB
            h.trim(length, off, flags)
            buf = pattern(seed + 50 + i, length)
            h.pwrite(buf, off)
            model[off:off + length] = buf
            verify(h, off, length, "%s: rewrite after trim(flags=%d)" % (tag, flags))

        # -- cache and flush ---------------------------------------------
        h.cache(1 * MiB, 0)
        h.cache(1000, 513)
        h.flush()

        # Whole image through this connection.
        for off in range(0, STD_SIZE, 4 * MiB):
            verify(h, off, 4 * MiB, tag + ": final full read")
        h.shutdown()
        del h

    srv.stop()
    with open(img, "rb") as f:
        check_bytes("image file after all commands", model, f.read())


# ---------------------------------------------------------------------------

class ErrorChecks:
    """Run commands expected to fail, collect every mismatch, and make sure
    the connection still works after each one."""

    def __init__(self, probe_data):
        self.failures = []
        self.probe_data = probe_data

    def expect(self, h, what, fn, allowed, quirk=None):
        try:
            fn()
        except nbd.Error as e:
            seen = e.errnum
            try:
                if seen in allowed:
                    note("%s -> %s (%s)" % (what, errno_name(seen), e.string))
                else:
                    check_errno(what + " -> errno", allowed, seen, quirk)
            except Exception as f:
                self.failures.append(str(f) + "\n  (libnbd: %s)" % e.string)
        else:
            self.failures.append(
                "%s:\n  expected: error %s\n  seen:     success"
                % (what, " or ".join(errno_name(a) for a in allowed)))
        self.still_alive(h, what)

    def still_alive(self, h, what):
        try:
            data = h.pread(len(self.probe_data), 0)
        except nbd.Error as e:
            self.failures.append("after %s the connection no longer works:"
                                 " pread failed: %s" % (what, e))
            raise _Dead()
        if bytes(data) != self.probe_data:
            self.failures.append("after %s a pread returned wrong data" % what)

    def record(self, h, what, fn):
        """Behaviour the spec leaves open: note it, only require the
        connection to survive."""
        try:
            fn()
            note("%s -> success" % what)
        except nbd.Error as e:
            note("%s -> %s (%s)" % (what, errno_name(e.errnum), e.string))
        self.still_alive(h, what)

    def finish(self):
        if self.failures:
            fail("%d error-handling check(s) failed:\n\n%s"
                 % (len(self.failures), "\n\n".join(self.failures)))


class _Dead(Exception):
    pass


def _raw_unknown_command(sock, probe):
    """NBD_CMD 42 (unknown) via the raw client -> EINVAL, then a read works."""
    with nbdraw.RawNBD(sock) as c:
        c.start()
        c.structured_reply()
        final, _ = c.go("")
        check_eq("NBD_OPT_GO reply", nbdraw.rep_name(nbdraw.REP_ACK), nbdraw.rep_name(final))
        r = c.simple_cmd(42, 0, 512)
        check_eq("error for unknown command type 42", errno_name(EINVAL),
                 errno_name(r["error"]))
        r = c.read(0, len(probe))
        check_eq("error of a read after the unknown command", 0, r["error"])
        check_bytes("read after the unknown command", probe, r["data"])
        c.disconnect()


@case
def negative_commands(ctx):
    """Invalid requests get the right errno and never kill the connection:
    out-of-range read/write/zero/trim/cache/block-status, oversized read,
    flags not valid for the command (also DF without structured replies),
    block status without a meta context, an unknown command, and
    write/trim/zero on a read-only export (EPERM)."""
    size = 48 * MiB  # larger than the 32 MiB maximum request size
    img = ctx.path("disk.raw")
    content = make_sparse_image(img, size, [(0, 64 * KiB), (40 * MiB, 64 * KiB)])
    probe = content[:4096]
    srv = ctx.start_server(img)
    chk = ErrorChecks(probe)
    try:
        h = connect(srv.sock, strict=0)
        end = h.get_size()
        check_eq("size", size, end)
        E = chk.expect
        E(h, "pread 4096 bytes at size-1024", lambda: h.pread(4096, end - 1024), (EINVAL,))
        E(h, "pread 1 byte at size", lambda: h.pread(1, end), (EINVAL,))
        E(h, "pread 512 bytes at offset 2^62", lambda: h.pread(512, 1 << 62), (EINVAL,))
        E(h, "pwrite 4096 bytes at size-1024", lambda: h.pwrite(b"x" * 4096, end - 1024),
          (ENOSPC, EINVAL))
        E(h, "pwrite 1 byte at size", lambda: h.pwrite(b"x", end), (ENOSPC, EINVAL))
        E(h, "zero 4096 bytes at size-1024", lambda: h.zero(4096, end - 1024),
          (ENOSPC, EINVAL))
        E(h, "trim 4096 bytes at size-1024", lambda: h.trim(4096, end - 1024),
          (EINVAL, ENOSPC))
        E(h, "cache 4096 bytes at size-1024", lambda: h.cache(4096, end - 1024), (EINVAL,))
        E(h, "block status 4096 bytes at size-1024",
          lambda: h.block_status(4096, end - 1024, lambda *a: 0), (EINVAL,))
        E(h, "block status at size", lambda: h.block_status(4096, end, lambda *a: 0), (EINVAL,))
        E(h, "pread of 32 MiB + 4 KiB (over the 32 MiB maximum)",
          lambda: h.pread(32 * MiB + 4096, 0), (EINVAL, EOVERFLOW))
        check_bytes("pread of exactly 32 MiB", content[:32 * MiB], h.pread(32 * MiB, 0))
        E(h, "pread with CMD_FLAG_REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), (EINVAL,))
        E(h, "pread with NO_HOLE", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), (EINVAL,))
        E(h, "pread with unknown flag 1<<10", lambda: h.pread(512, 0, 1 << 10), (EINVAL,))
        E(h, "pread with unknown flag 1<<15", lambda: h.pread(512, 0, 1 << 15), (EINVAL,))
        E(h, "pwrite with NO_HOLE", lambda: h.pwrite(probe[:512], 0, nbd.CMD_FLAG_NO_HOLE), (EINVAL,))
        E(h, "pwrite with DF", lambda: h.pwrite(probe[:512], 0, nbd.CMD_FLAG_DF), (EINVAL,))
        E(h, "trim with NO_HOLE", lambda: h.trim(512, 8 * MiB, nbd.CMD_FLAG_NO_HOLE), (EINVAL,))
        E(h, "zero with DF", lambda: h.zero(512, 8 * MiB, nbd.CMD_FLAG_DF), (EINVAL,))
        E(h, "block status with DF", lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_DF), (EINVAL,))
        E(h, "cache with REQ_ONE", lambda: h.cache(512, 0, nbd.CMD_FLAG_REQ_ONE), (EINVAL,))
        E(h, "flush with NO_HOLE", lambda: h.flush(nbd.CMD_FLAG_NO_HOLE), (EINVAL,))
        E(h, "pwrite with FAST_ZERO", lambda: h.pwrite(probe[:512], 0, nbd.CMD_FLAG_FAST_ZERO), (EINVAL,))
        E(h, "trim with FAST_ZERO", lambda: h.trim(512, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO), (EINVAL,))
        E(h, "zero with REQ_ONE", lambda: h.zero(512, 8 * MiB, nbd.CMD_FLAG_REQ_ONE), (EINVAL,))
        # Left open by the spec: only the connection must survive.
        chk.record(h, "pread of length 0", lambda: h.pread(0, 0))
        chk.record(h, "pwrite of length 0", lambda: h.pwrite(b"", 0))
        chk.record(h, "zero of length 0", lambda: h.zero(0, 0))
        chk.record(h, "trim of length 0", lambda: h.trim(0, 0))
        chk.record(h, "block status of length 0", lambda: h.block_status(0, 0, lambda *a: 0))
        chk.record(h, "pread with FUA", lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA))
        chk.record(h, "flush with FUA", lambda: h.flush(nbd.CMD_FLAG_FUA))
        chk.record(h, "block status with FUA", lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_FUA))
        h.shutdown()
        del h

        # Structured replies but no meta context: block status is invalid.
        h = connect(srv.sock, structured=True, meta=False, strict=0)
        E = chk.expect
        E(h, "block status without a negotiated meta context",
          lambda: h.block_status(4096, 0, lambda *a: 0), (EINVAL,))
        h.shutdown()
        del h

        # No structured replies: DF is not advertised, so it is invalid.
        h = connect(srv.sock, structured=False, meta=False, strict=0)
        check_eq("can_df() without structured replies", False, h.can_df())
        chk.expect(h, "pread with DF without structured replies (flag not advertised)",
                   lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), (EINVAL,))
        chk.expect(h, "pread past the end with simple replies",
                   lambda: h.pread(4096, end - 1024), (EINVAL,))
        chk.expect(h, "pwrite past the end with simple replies",
                   lambda: h.pwrite(b"y" * 4096, end - 1024), (ENOSPC, EINVAL))
        h.shutdown()
        del h

        _raw_unknown_command(srv.sock, probe)

        # Read-only export.
        ro = ctx.start_server(img, readonly=True)
        h = connect(ro.sock, strict=0)
        check(h.is_read_only(), "-r export is not flagged read-only")
        E = chk.expect
        E(h, "pwrite on a read-only export", lambda: h.pwrite(b"z" * 4096, 0), (EPERM,), QUIRK_EPERM)
        E(h, "pwrite+FUA on a read-only export",
          lambda: h.pwrite(b"z" * 512, 4096, nbd.CMD_FLAG_FUA), (EPERM,), QUIRK_EPERM)
        E(h, "trim on a read-only export", lambda: h.trim(4096, 0), (EPERM,), QUIRK_EPERM)
        E(h, "zero on a read-only export", lambda: h.zero(4096, 0), (EPERM,), QUIRK_EPERM)
        h.shutdown()
        del h
    except _Dead:
        pass
    chk.finish()


# ---------------------------------------------------------------------------

@case
def read_only_flags(ctx):
    """With -r: nbdinfo and libnbd see a read-only export; reads work;
    pwrite/zero/trim sent anyway (strict mode off, and a raw NBD_CMD_WRITE
    with payload) fail with EPERM without breaking the connection; the image
    file is unchanged."""
    img = ctx.path("disk.raw")
    content = make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    before = sha256_file(img)
    srv = ctx.start_server(img, readonly=True)

    res = ctx.run(["nbdinfo", "--is", "readonly", srv.uri()], check=False, timeout=20)
    check_eq("`nbdinfo --is readonly` exit status (0 = read-only)", 0, res.returncode)

    h = connect(srv.sock, strict=0)
    check(h.is_read_only(), "libnbd: is_read_only() is false on a -r export")
    check_bytes("pread on the read-only export", content[:1 * MiB], h.pread(1 * MiB, 0))
    chk = ErrorChecks(content[:4096])
    try:
        for what, fn in (("pwrite", lambda: h.pwrite(b"w" * 4096, 0)),
                         ("pwrite unaligned", lambda: h.pwrite(b"w" * 1000, 513)),
                         ("zero", lambda: h.zero(4096, 0)),
                         ("trim", lambda: h.trim(4096, 0))):
            chk.expect(h, what + " on the read-only export", fn, (EPERM,), QUIRK_EPERM)
    except _Dead:
        pass
    chk.finish()
    h.shutdown()
    del h

    # Raw NBD_CMD_WRITE with a payload: the server must consume the payload
    # and answer, and the next request must still be understood.
    with nbdraw.RawNBD(srv.sock) as c:
        c.start()
        final, _ = c.go("")
        check_eq("NBD_OPT_GO on the read-only export", "NBD_REP_ACK", nbdraw.rep_name(final))
        check(c.tflags & nbdraw.TF_READ_ONLY, "NBD_FLAG_READ_ONLY not set in"
              " transmission flags 0x%x" % c.tflags)
        r = c.write(0, b"R" * 65536)
        check_errno("errno of a raw 64 KiB NBD_CMD_WRITE on a read-only export",
                 (EPERM,), r["error"], QUIRK_EPERM)
        r = c.read(0, 4096)
        check_eq("error of the raw read after the refused write", 0, r["error"])
        check_bytes("raw read after the refused write", content[:4096], r["data"])
        c.disconnect()

    srv.stop()
    check_eq("sha256 of the image after the read-only session", before, sha256_file(img))


# ---------------------------------------------------------------------------

@case
def multi_client_writes(ctx):
    """-e 8: eight clients on their own connections (half with structured
    replies) each write a disjoint 2 MiB region with its own pattern using
    ~150 aio requests each, up to 16 in flight (sizes 1 B..24 KiB,
    unaligned; FUA on some),
    then flush.  Everything reads back correctly, qemu-img compare against
    the expected file is identical over NBD and on disk after stopping."""
    nclients = 8
    region = 2 * MiB
    size = nclients * region
    img = ctx.path("disk.raw")
    make_sparse_image(img, size, [])
    expected = bytearray(size)
    srv = ctx.start_server(img, shared=nclients)

    # Pre-compute each client's requests: consecutive slices of its region
    # with sizes from 1 byte to 64 KiB (leaving a few gaps as holes).
    plans = []
    for i in range(nclients):
        rnd = pattern(1000 + i, 4096)
        reqs = []
        pos = i * region
        k = 0
        while pos < (i + 1) * region - 64 * KiB:
            length = 1 + (rnd[k % 4096] * 256 + rnd[(k + 1) % 4096]) % (24 * KiB)
            if k % 17 == 5:
                pos += length  # leave a gap
            else:
                data = pattern(i * 100000 + k, length)
                flags = nbd.CMD_FLAG_FUA if k % 11 == 0 else 0
                reqs.append((pos, data, flags))
                expected[pos:pos + length] = data
                pos += length
            k += 2
        plans.append(reqs)

    errors = []
    barrier = threading.Barrier(nclients, timeout=30)

    def client(i):
        try:
            h = connect(srv.sock, structured=(i % 2 == 0), meta=False)
            barrier.wait()
            cookies = []
            for off, data, flags in plans[i]:
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                cookies.append(h.aio_pwrite(buf, off, flags=flags))
                # Keep up to 16 requests in flight.
                while h.aio_in_flight() >= 16:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cookies:
                if not h.aio_command_completed(c):
                    errors.append("client %d: request %d never completed" % (i, c))
            h.flush()
            h.shutdown()
        except Exception as e:  # report from the main thread
            errors.append("client %d: %s: %s" % (i, type(e).__name__, e))

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(nclients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if any(t.is_alive() for t in threads):
        fail("writer threads still running after 60 s")
    if errors:
        fail("concurrent writers failed:\n  " + "\n  ".join(errors))
    note("%d requests in total from %d clients"
         % (sum(len(p) for p in plans), nclients))

    h = connect(srv.sock)
    for off in range(0, size, 4 * MiB):
        check_bytes("read back [%d, +4 MiB)" % off, expected[off:off + 4 * MiB],
                    h.pread(4 * MiB, off))
    h.shutdown()
    del h

    exp_file = ctx.path("expected.raw")
    with open(exp_file, "wb") as f:
        f.write(expected)
    ctx.qemu_img_compare(exp_file, srv.uri(), what="expected vs export (over NBD)")
    srv.stop()
    ctx.qemu_img_compare(exp_file, img, what="expected vs image file after stop")
