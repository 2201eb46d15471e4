"""Handshake and framing robustness, with a hand-written client (nbdraw)."""

import socket
import struct
import time

import nbd

import nbdraw
from nbdraw import (Closed, RawNBD, rep_name, REP_ACK, REP_ERR_INVALID,
                    REP_ERR_POLICY, REP_ERR_UNKNOWN, REP_ERR_UNSUP, OPT_ABORT,
                    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS,
                    OPT_STRUCTURED_REPLY)
from common import (KiB, MiB, STD_EXTENTS, STD_SIZE, CaseFailure, case,
                    check, check_bytes, check_eq, check_errno, check_in, fail,
                    make_sparse_image, note, pattern)

UNKNOWN_OPT = 0x4242


def expect_reply(what, replies, allowed):
    """The final reply type of an option must be one of ``allowed``."""
    final = replies[-1][0]
    check_in(what, allowed, final, fmt=rep_name)
    if final & 0x80000000:
        note("%s -> %s %r" % (what, rep_name(final), replies[-1][1][:120]))


def go_and_read(c, content, what):
    """NBD_OPT_GO on the default export, then a read must return the image."""
    final, _ = c.go("")
    check_eq("%s: NBD_OPT_GO reply" % what, "NBD_REP_ACK", rep_name(final))
    check_eq("%s: export size from NBD_INFO_EXPORT" % what, len(content), c.size)
    r = c.read(0, 4096)
    check_eq("%s: read error" % what, 0, r["error"])
    check_bytes("%s: read after NBD_OPT_GO" % what, content[:4096], r["data"])
    c.disconnect()


# Each step gets (sock, content) and either returns or raises CaseFailure.

def step_connect_close(sock, content):
    """Connect and close at once (before reading the greeting)."""
    RawNBD(sock).close()


def step_close_after_greeting(sock, content):
    """Read the greeting, then close without sending client flags."""
    with RawNBD(sock) as c:
        c.greeting()


def step_garbage_client_flags(sock, content):
    """Garbage instead of client flags: the server must drop the connection."""
    with RawNBD(sock) as c:
        c.greeting()
        c.send(b"\xde\xad\xbe\xef\x01\x02\x03\x04GARBAGE!")
        got = c.wait_closed()
        check_eq("bytes sent by the server before closing on garbage flags", b"", got)


def step_unknown_client_flags(sock, content):
    """Client flags with an unknown bit (1<<5): MUST drop the connection."""
    with RawNBD(sock) as c:
        c.greeting()
        c.send(struct.pack(">I", nbdraw.FLAG_C_FIXED_NEWSTYLE | (1 << 5)))
        got = c.wait_closed()
        check_eq("bytes sent by the server before closing on unknown flags", b"", got)


def step_bad_option_magic(sock, content):
    """Valid client flags, then an option whose magic is not IHAVEOPT."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(OPT_GO, RawNBD.go_payload(""), magic=0x1122334455667788)
        got = c.wait_closed()
        check_eq("bytes sent by the server before closing on bad option magic", b"", got)


def step_huge_option_length(sock, content):
    """Option header claiming 0xFFFFFFF0 bytes of data, then EOF.

    The server must neither allocate that much nor hang."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(OPT_GO, b"", length=0xFFFFFFF0)
        time.sleep(0.1)
        c.s.shutdown(socket.SHUT_WR)
        c.wait_closed()


def step_huge_unknown_option(sock, content):
    """Same with an unknown option number (may be skipped by reading)."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(UNKNOWN_OPT, b"x" * 100, length=0xFFFFFFF0)
        time.sleep(0.1)
        c.s.shutdown(socket.SHUT_WR)
        c.wait_closed()


def step_long_export_name(sock, content):
    """NBD_OPT_EXPORT_NAME with a 5000-byte name: the session must end.

    Strings are at most 4096 bytes and no such export exists, so the server
    must close without sending any export data."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(OPT_EXPORT_NAME, b"n" * 5000)
        got = c.wait_closed()
        check_eq("bytes sent in reply to a 5000-byte NBD_OPT_EXPORT_NAME", b"", got)


def step_unknown_export_name(sock, content):
    """NBD_OPT_EXPORT_NAME for a missing export: the session must end."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(OPT_EXPORT_NAME, b"no-such-export")
        got = c.wait_closed()
        check_eq("bytes sent in reply to NBD_OPT_EXPORT_NAME of a missing export",
                 b"", got)


def step_go_name_overflow(sock, content):
    """NBD_OPT_GO with name length > option length: NBD_REP_ERR_INVALID.

    The name length field says 100, the option holds 3 bytes; the connection
    stays usable."""
    with RawNBD(sock) as c:
        c.start()
        data = struct.pack(">I", 100) + b"abc" + struct.pack(">H", 0)
        expect_reply("NBD_OPT_GO with name length > option length",
                     c.option(OPT_GO, data), (REP_ERR_INVALID,))
        go_and_read(c, content, "after the inconsistent NBD_OPT_GO")


def step_go_unknown_export(sock, content):
    """NBD_OPT_GO for a missing export: NBD_REP_ERR_UNKNOWN, still usable."""
    with RawNBD(sock) as c:
        c.start()
        final, _ = c.go("no-such-export")
        check_in("NBD_OPT_GO of a missing export", (REP_ERR_UNKNOWN,), final,
                 fmt=rep_name)
        go_and_read(c, content, "after NBD_OPT_GO of a missing export")


def step_unknown_option(sock, content):
    """Unknown option 0x4242: NBD_REP_ERR_UNSUP, then NBD_OPT_GO works.

    NBD_REP_ERR_UNSUP is 0x80000001; GO and a read use the same connection."""
    with RawNBD(sock) as c:
        c.start()
        expect_reply("unknown option 0x4242", c.option(UNKNOWN_OPT, b"payload!"),
                     (REP_ERR_UNSUP,))
        go_and_read(c, content, "after an unknown option")


def step_list_with_payload(sock, content):
    """NBD_OPT_LIST with a payload: NBD_REP_ERR_INVALID, still usable.

    A correct LIST (listing only the default export) and GO work after it."""
    with RawNBD(sock) as c:
        c.start()
        expect_reply("NBD_OPT_LIST with a payload", c.option(OPT_LIST, b"xyz"),
                     (REP_ERR_INVALID,))
        replies = c.option(OPT_LIST)
        check_eq("final reply of a correct NBD_OPT_LIST", "NBD_REP_ACK",
                 rep_name(replies[-1][0]))
        names = []
        for rep, data in replies[:-1]:
            check_eq("NBD_OPT_LIST reply type", "NBD_REP_SERVER", rep_name(rep))
            (n,) = struct.unpack(">I", data[:4])
            names.append(data[4:4 + n].decode())
        check_eq("exports listed", [""], names)
        go_and_read(c, content, "after NBD_OPT_LIST")


def step_structured_reply_with_payload(sock, content):
    """NBD_OPT_STRUCTURED_REPLY with a payload: NBD_REP_ERR_INVALID."""
    with RawNBD(sock) as c:
        c.start()
        expect_reply("NBD_OPT_STRUCTURED_REPLY with a payload",
                     c.option(OPT_STRUCTURED_REPLY, b"x"), (REP_ERR_INVALID,))
        go_and_read(c, content, "after a bad NBD_OPT_STRUCTURED_REPLY")


def step_starttls_without_tls(sock, content):
    """NBD_OPT_STARTTLS without TLS: NBD_REP_ERR_POLICY or _UNSUP.

    That is NOTLS mode; GO then works in plain text."""
    with RawNBD(sock) as c:
        c.start()
        expect_reply("NBD_OPT_STARTTLS without TLS", c.option(OPT_STARTTLS),
                     (REP_ERR_POLICY, REP_ERR_UNSUP))
        go_and_read(c, content, "after a refused NBD_OPT_STARTTLS")


def step_abort(sock, content):
    """NBD_OPT_ABORT: the server replies NBD_REP_ACK and closes."""
    with RawNBD(sock) as c:
        c.start()
        expect_reply("NBD_OPT_ABORT", c.option(OPT_ABORT), (REP_ACK,))
        c.wait_closed()


def step_eof_inside_option(sock, content):
    """EOF in the middle of an option payload."""
    with RawNBD(sock) as c:
        c.start()
        c.send_option(OPT_GO, b"\x00\x00", length=100)
        c.s.shutdown(socket.SHUT_WR)
        c.wait_closed()


def step_bad_request_magic(sock, content):
    """Request with bad magic after a good handshake: the server closes.

    It cannot resynchronise; it may send an error reply first."""
    with RawNBD(sock) as c:
        c.start()
        final, _ = c.go("")
        check_eq("NBD_OPT_GO reply", "NBD_REP_ACK", rep_name(final))
        c.request(nbdraw.CMD_READ, 0, 512, magic=0x12345678)
        got = c.wait_closed()
        if got:
            note("before closing on a bad request magic the server sent %d"
                 " bytes: %s" % (len(got), got[:32].hex()))


def step_disconnect_with_requests_in_flight(sock, content):
    """Send 8 reads and a truncated write, then vanish."""
    with RawNBD(sock) as c:
        c.start()
        final, _ = c.go("")
        check_eq("NBD_OPT_GO reply", "NBD_REP_ACK", rep_name(final))
        for i in range(8):
            c.request(nbdraw.CMD_READ, i * 65536, 65536)
        c.send(struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, nbdraw.CMD_WRITE,
                           99, 0, 65536) + b"partial")


STEPS = [
    step_connect_close,
    step_close_after_greeting,
    step_garbage_client_flags,
    step_unknown_client_flags,
    step_bad_option_magic,
    step_huge_option_length,
    step_huge_unknown_option,
    step_long_export_name,
    step_unknown_export_name,
    step_go_name_overflow,
    step_go_unknown_export,
    step_unknown_option,
    step_list_with_payload,
    step_structured_reply_with_payload,
    step_starttls_without_tls,
    step_abort,
    step_eof_inside_option,
    step_bad_request_magic,
    step_disconnect_with_requests_in_flight,
]


@case
def handshake_abuse(ctx):
    """Malformed handshakes and framing (garbage/unknown client flags, bad
    option magic, 0xFFFFFFF0 option length, 5000-byte export name, GO name
    length > option length, unknown option, LIST with payload, bad request
    magic, EOF mid-option, vanishing with requests in flight, ...) are
    handled per spec, each on its own connection, and afterwards the same
    server still serves nbdinfo and libnbd correctly."""
    img = ctx.path("disk.raw")
    content = make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    # Default -e (1 client at a time): a connection the server fails to
    # release would also block the following steps.
    srv = ctx.start_server(img)
    failures = []
    for step in STEPS:
        try:
            step(srv.sock, content)
        except CaseFailure as e:
            failures.append("%s (%s):\n  %s" % (step.__name__,
                                                step.__doc__.split("\n")[0], e))
        except (Closed, OSError) as e:
            failures.append("%s (%s):\n  unexpected connection error: %s"
                            % (step.__name__, step.__doc__.split("\n")[0], e))
        if not srv.alive():
            failures.append("server died after %s (exit status %s)"
                            % (step.__name__, srv.proc.returncode))
            break
    if srv.alive():
        res = ctx.run(["nbdinfo", "--json", srv.uri()], check=False, timeout=20)
        if res.returncode != 0:
            failures.append("nbdinfo after all steps failed (exit %d): %s"
                            % (res.returncode, res.err.strip()))
        else:
            try:
                h = nbd.NBD()
                h.connect_unix(srv.sock)
                if bytes(h.pread(64 * KiB, 0)) != content[:64 * KiB]:
                    failures.append("libnbd read after all steps returned wrong data")
                h.shutdown()
                del h
            except nbd.Error as e:
                failures.append("libnbd connect/read after all steps failed: %s" % e)
    if failures:
        fail("%d of %d handshake steps misbehaved:\n\n%s"
             % (len(failures), len(STEPS), "\n\n".join(failures)))


@case
def unknown_option_then_go(ctx):
    """Raw fixed-newstyle session: unknown options (one with a 64 KiB payload
    the server must skip) get NBD_REP_ERR_UNSUP, NBD_OPT_INFO then
    NBD_OPT_GO report size, flags, name, description and block sizes; raw
    simple-reply write/read/flush/disconnect work; a structured-reply
    connection gets OFFSET_HOLE / OFFSET_DATA chunks and a block status
    chunk; libnbd sees the raw write."""
    img = ctx.path("disk.raw")
    content = bytearray(make_sparse_image(img, STD_SIZE, STD_EXTENTS))
    srv = ctx.start_server(img, name="raw", desc="raw handshake")

    with RawNBD(srv.sock) as c:
        hflags = c.greeting()
        check(hflags & nbdraw.FLAG_FIXED_NEWSTYLE,
              "server did not set NBD_FLAG_FIXED_NEWSTYLE (flags 0x%x)" % hflags)
        c.client_flags()
        for payload in (b"", b"q" * (64 * KiB)):
            replies = c.option(UNKNOWN_OPT, payload)
            check_eq("reply to unknown option with %d-byte payload" % len(payload),
                     "NBD_REP_ERR_UNSUP", rep_name(replies[-1][0]))
        reqs = (nbdraw.INFO_NAME, nbdraw.INFO_DESCRIPTION, nbdraw.INFO_BLOCK_SIZE)
        final, infos = c.go("raw", reqs, opt=OPT_INFO)
        check_eq("NBD_OPT_INFO reply", "NBD_REP_ACK", rep_name(final))
        check_eq("size from NBD_OPT_INFO", STD_SIZE, c.size)
        final, infos = c.go("raw", reqs)
        check_eq("NBD_OPT_GO reply", "NBD_REP_ACK", rep_name(final))
        check_eq("size from NBD_OPT_GO", STD_SIZE, c.size)
        tf = c.tflags
        note("transmission flags without structured replies: 0x%04x" % tf)
        for bit, name in ((nbdraw.TF_HAS_FLAGS, "HAS_FLAGS"),
                          (nbdraw.TF_SEND_FLUSH, "SEND_FLUSH"),
                          (nbdraw.TF_SEND_FUA, "SEND_FUA"),
                          (nbdraw.TF_SEND_TRIM, "SEND_TRIM"),
                          (nbdraw.TF_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
                          (nbdraw.TF_SEND_CACHE, "SEND_CACHE")):
            check(tf & bit, "transmission flag NBD_FLAG_%s missing (0x%04x)" % (name, tf))
        check(not tf & nbdraw.TF_READ_ONLY, "NBD_FLAG_READ_ONLY set on a writable export")
        check(not tf & nbdraw.TF_SEND_DF,
              "NBD_FLAG_SEND_DF set although structured replies were not negotiated")
        if nbdraw.INFO_BLOCK_SIZE in infos:
            check_eq("NBD_INFO_BLOCK_SIZE (min, preferred, max)",
                     (1, 4096, 32 * MiB), struct.unpack(">III", infos[nbdraw.INFO_BLOCK_SIZE][:12]))
        else:
            fail("NBD_INFO_BLOCK_SIZE was requested but not sent")
        if nbdraw.INFO_DESCRIPTION in infos:
            check_eq("NBD_INFO_DESCRIPTION", b"raw handshake", infos[nbdraw.INFO_DESCRIPTION])
        else:
            fail("NBD_INFO_DESCRIPTION was requested but not sent (export has -D)")
        note("NBD_INFO_NAME %s" % ("sent: %r" % infos[nbdraw.INFO_NAME]
                                   if nbdraw.INFO_NAME in infos else "not sent"))

        data = pattern(42, 5000)
        r = c.write(12345, data)
        check_eq("raw simple-reply write error", 0, r["error"])
        check(r["simple"], "got a structured reply without negotiating it")
        content[12345:12345 + len(data)] = data
        r = c.read(12000, 6000)
        check_eq("raw read error", 0, r["error"])
        check_bytes("raw read after raw write", content[12000:18000], r["data"])
        r = c.simple_cmd(nbdraw.CMD_FLUSH)
        check_eq("raw flush error", 0, r["error"])
        c.disconnect()
        c.wait_closed()

    # Structured replies: hole and data chunks, block status chunk.
    with RawNBD(srv.sock) as c:
        c.start()
        check_eq("NBD_OPT_STRUCTURED_REPLY reply", "NBD_REP_ACK",
                 rep_name(c.structured_reply()))
        status, ids = c.set_meta_context("raw", ["base:allocation"])
        check_eq("NBD_OPT_SET_META_CONTEXT reply", "NBD_REP_ACK", rep_name(status))
        check("base:allocation" in ids, "base:allocation not selected: %r" % ids)
        final, _ = c.go("raw")
        check_eq("NBD_OPT_GO reply", "NBD_REP_ACK", rep_name(final))
        note("transmission flags with structured replies: 0x%04x" % c.tflags)
        r = c.read(7 * MiB, 64 * KiB)
        check_eq("structured read error (hole)", 0, r["error"])
        types = [ch[0] for ch in r["chunks"]]
        check(nbdraw.REPLY_TYPE_OFFSET_HOLE in types,
              "expected an NBD_REPLY_TYPE_OFFSET_HOLE chunk for a hole, got chunk"
              " types %r" % types)
        check_bytes("structured read of a hole", bytes(64 * KiB), r["data"])
        r = c.read(3 * MiB, 64 * KiB)
        check_eq("structured read error (data)", 0, r["error"])
        check_bytes("structured read of data", content[3 * MiB:3 * MiB + 64 * KiB], r["data"])
        # With structured replies even an early read error must be a
        # structured reply (spec: MUST NOT use a simple reply for READ).
        r = c.read(STD_SIZE - 512, 4096)
        check(not r["simple"], "a failed read got a simple reply although"
              " structured replies were negotiated")
        check_errno("error of a structured read past the end",
                    (nbdraw.NBD_EINVAL,), r["error"])
        r = c.read(0, 512)
        check_bytes("structured read after the error", content[:512], r["data"])
        r = c.simple_cmd(nbdraw.CMD_BLOCK_STATUS, 0, 1 * MiB)
        check_eq("block status error", 0, r["error"])
        bs = [ch for ch in r["chunks"] if ch[0] == nbdraw.REPLY_TYPE_BLOCK_STATUS]
        check_eq("number of NBD_REPLY_TYPE_BLOCK_STATUS chunks", 1, len(bs))
        payload = bs[0][2]
        (cid,) = struct.unpack(">I", payload[:4])
        check_eq("metadata context id in block status", ids["base:allocation"], cid)
        ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
        check(ext and ext[0] == (192 * KiB, 0),
              "first extent should be (192 KiB, data), got %r" % ext[:4])
        c.disconnect()
        c.wait_closed()

    h = nbd.NBD()
    h.connect_uri(srv.uri("raw"))
    check_bytes("libnbd read of the raw write", content[12345:12345 + 5000],
                h.pread(5000, 12345))
    h.shutdown()
