"""A minimal hand-written NBD client (fixed newstyle) over a unix socket.

Used where libnbd is too polite: malformed handshakes, unknown options,
bad request magic.  Built with struct.pack from the NBD protocol document
(doc/proto.md in the NetworkBlockDevice/nbd repository).
"""

import socket
import struct

from common import fail

# Handshake
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0         # client flags
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

REP_NAMES = {
    REP_ACK: "NBD_REP_ACK", REP_SERVER: "NBD_REP_SERVER",
    REP_INFO: "NBD_REP_INFO", REP_META_CONTEXT: "NBD_REP_META_CONTEXT",
    REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP", REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# Transmission
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108


def rep_name(rep):
    return REP_NAMES.get(rep, "0x%08x" % rep)


class Closed(Exception):
    """The server closed the connection."""


class RawNBD:
    """One raw connection.  Every blocking call has a timeout."""

    def __init__(self, sock_path, timeout=10.0):
        self.sock_path = sock_path
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        self.handshake_flags = None
        self.size = None
        self.tflags = None
        self.no_zeroes = False
        self.structured = False
        self._handle = 0

    # -- low level --------------------------------------------------------

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n, what="data"):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.s.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                fail("timed out waiting for %s from the server (%d of %d bytes"
                     " received)" % (what, len(buf), n))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed("server closed the connection while we waited for"
                             " %s (%d of %d bytes received)" % (what, len(buf), n))
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout=5.0):
        """Read until EOF.  Returns the bytes the server sent before closing,
        or fails if the connection is still open after ``timeout``."""
        self.s.settimeout(timeout)
        got = bytearray()
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return bytes(got)
                got += chunk
                if len(got) > 1 << 20:
                    fail("server kept sending data instead of closing")
        except ConnectionResetError:
            return bytes(got)
        except socket.timeout:
            fail("expected the server to close the connection within %.0f s,"
                 " but it stayed open (%d bytes received meanwhile: %s)"
                 % (timeout, len(got), bytes(got[:64]).hex()))

    # -- handshake --------------------------------------------------------

    def greeting(self):
        data = self.recv_exact(18, "the newstyle greeting")
        magic, opt_magic, hflags = struct.unpack(">QQH", data)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            fail("bad server greeting: %s (expected NBDMAGIC IHAVEOPT flags)"
                 % data.hex())
        self.handshake_flags = hflags
        return hflags

    def client_flags(self, flags=None):
        if flags is None:
            flags = FLAG_C_FIXED_NEWSTYLE
            if self.handshake_flags & FLAG_NO_ZEROES:
                flags |= FLAG_C_NO_ZEROES
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def start(self):
        """Greeting + standard client flags."""
        self.greeting()
        self.client_flags()
        return self

    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def recv_option_reply(self, expect_opt=None):
        hdr = self.recv_exact(20, "an option reply header")
        magic, opt, rep, length = struct.unpack(">QIII", hdr)
        if magic != OPT_REPLY_MAGIC:
            fail("bad option reply magic 0x%x (expected 0x%x); header %s"
                 % (magic, OPT_REPLY_MAGIC, hdr.hex()))
        if expect_opt is not None and opt != expect_opt:
            fail("option reply is for option %d, expected option %d"
                 % (opt, expect_opt))
        if length > 16 << 20:
            fail("absurd option reply length %d" % length)
        data = self.recv_exact(length, "option reply data") if length else b""
        return rep, data

    def option(self, opt, data=b"", length=None):
        """Send one option and collect replies up to the final one.

        Returns ``[(reply_type, data), ...]``; the last entry is the final
        reply (ACK or an error).
        """
        self.send_option(opt, data, length)
        replies = []
        while True:
            rep, rdata = self.recv_option_reply(expect_opt=opt)
            replies.append((rep, rdata))
            if rep == REP_ACK or rep & 0x80000000:
                return replies
            if len(replies) > 10000:
                fail("too many option replies")

    def structured_reply(self):
        replies = self.option(OPT_STRUCTURED_REPLY)
        self.structured = replies[-1][0] == REP_ACK
        return replies[-1][0]

    def set_meta_context(self, export, contexts):
        data = struct.pack(">I", len(export)) + export.encode()
        data += struct.pack(">I", len(contexts))
        for c in contexts:
            data += struct.pack(">I", len(c)) + c.encode()
        replies = self.option(OPT_SET_META_CONTEXT, data)
        ids = {}
        for rep, rdata in replies:
            if rep == REP_META_CONTEXT:
                (cid,) = struct.unpack(">I", rdata[:4])
                ids[rdata[4:].decode()] = cid
        return replies[-1][0], ids

    @staticmethod
    def go_payload(name, info_requests=()):
        raw = name.encode() if isinstance(name, str) else name
        data = struct.pack(">I", len(raw)) + raw
        data += struct.pack(">H", len(info_requests))
        for r in info_requests:
            data += struct.pack(">H", r)
        return data

    def go(self, name="", info_requests=(INFO_BLOCK_SIZE,), opt=OPT_GO):
        """NBD_OPT_GO (or INFO).  Returns ``(final_reply, infos)`` where
        ``infos`` maps info type -> payload.  On ACK (GO) the connection is in
        transmission phase and ``size``/``tflags`` are set."""
        replies = self.option(opt, self.go_payload(name, info_requests))
        infos = {}
        for rep, rdata in replies:
            if rep == REP_INFO and len(rdata) >= 2:
                (itype,) = struct.unpack(">H", rdata[:2])
                infos[itype] = rdata[2:]
        final = replies[-1][0]
        if final == REP_ACK:
            if INFO_EXPORT not in infos:
                fail("NBD_OPT_GO/INFO succeeded without NBD_INFO_EXPORT")
            self.size, self.tflags = struct.unpack(">QH", infos[INFO_EXPORT][:10])
        return final, infos

    def export_name(self, name=""):
        """NBD_OPT_EXPORT_NAME; returns (size, flags)."""
        raw = name.encode() if isinstance(name, str) else name
        self.send_option(OPT_EXPORT_NAME, raw)
        n = 10 if self.no_zeroes else 134
        data = self.recv_exact(n, "the NBD_OPT_EXPORT_NAME reply")
        self.size, self.tflags = struct.unpack(">QH", data[:10])
        return self.size, self.tflags

    # -- transmission -----------------------------------------------------

    def request(self, cmd, offset=0, length=0, flags=0, data=b"",
                magic=REQUEST_MAGIC):
        self._handle += 1
        handle = 0x5354524100000000 | self._handle  # "STRA...."
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset,
                              length) + data)
        return handle

    def recv_reply(self, handle, read_len=0):
        """Receive the complete reply for ``handle``.

        Returns a dict: ``error`` (0 on success), ``data`` (reassembled read
        buffer or None), ``chunks`` (list of (type, flags, payload)),
        ``simple`` (bool).  For a simple reply to a successful read the
        caller must pass ``read_len``.
        """
        hdr = self.recv_exact(4, "a reply magic")
        (magic,) = struct.unpack(">I", hdr)
        if magic == SIMPLE_REPLY_MAGIC:
            rest = self.recv_exact(12, "a simple reply")
            err, h = struct.unpack(">IQ", rest)
            if h != handle:
                fail("simple reply handle 0x%x != request handle 0x%x" % (h, handle))
            data = None
            if err == 0 and read_len:
                data = self.recv_exact(read_len, "read payload")
            return {"error": err, "data": data, "chunks": [], "simple": True}
        if magic != STRUCTURED_REPLY_MAGIC:
            fail("bad reply magic 0x%08x" % magic)
        chunks = []
        error = 0
        buf = bytearray(read_len) if read_len else None
        while True:
            if chunks:
                hdr = self.recv_exact(4, "a structured chunk magic")
                (magic,) = struct.unpack(">I", hdr)
                if magic != STRUCTURED_REPLY_MAGIC:
                    fail("bad structured chunk magic 0x%08x" % magic)
            rest = self.recv_exact(16, "a structured chunk header")
            cflags, ctype, h, length = struct.unpack(">HHQI", rest)
            if h != handle:
                fail("chunk handle 0x%x != request handle 0x%x" % (h, handle))
            payload = self.recv_exact(length, "chunk payload") if length else b""
            chunks.append((ctype, cflags, payload))
            if ctype & 0x8000:
                (err,) = struct.unpack(">I", payload[:4])
                error = error or err
            elif buf is not None and ctype == REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", payload[:8])
                chunks[-1] = (ctype, cflags, payload, off)
                rel = off - self._read_base
                buf[rel:rel + len(payload) - 8] = payload[8:]
            if cflags & REPLY_FLAG_DONE:
                break
        return {"error": error, "data": bytes(buf) if buf is not None and not error else None,
                "chunks": chunks, "simple": False}

    def read(self, offset, length, flags=0):
        self._read_base = offset
        h = self.request(CMD_READ, offset, length, flags)
        return self.recv_reply(h, read_len=length)

    def write(self, offset, data, flags=0):
        h = self.request(CMD_WRITE, offset, len(data), flags, data)
        return self.recv_reply(h)

    def simple_cmd(self, cmd, offset=0, length=0, flags=0):
        self._read_base = offset
        h = self.request(cmd, offset, length, flags)
        return self.recv_reply(h)

    def disconnect(self):
        self.request(CMD_DISC)
