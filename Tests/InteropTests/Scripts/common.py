"""Shared machinery for the Strata interop cases.

Everything a case needs lives here:

* ``CaseFailure`` / ``check`` / ``check_eq``: how a case reports what it
  expected and what it saw.
* ``Context``: one per case.  It owns a private temp dir under /tmp, the
  servers started for the case and every helper subprocess; ``close()``
  always stops the servers (SIGTERM, then SIGKILL after 5 s) and removes the
  temp dir.
* ``Server``: one NBD server process started from ``--server-cmd`` plus
  qemu-nbd style options, reachable through a unix socket.
* image helpers that build sparse raw files with a known data/hole layout.

Standard library only (plus ``nbd`` in the case modules).
"""

import errno
import hashlib
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

KiB = 1024
MiB = 1024 * 1024

# Timeouts (seconds).
SERVER_START_TIMEOUT = 20
SERVER_STOP_GRACE = 5
DEFAULT_CMD_TIMEOUT = 60


class CaseFailure(Exception):
    """A case did not see what it expected.  The message says both."""


class Options:
    """Run-wide options, set once by interop.py."""

    server_cmd = ["qemu-nbd"]
    # When true, the documented qemu-nbd 7.2 deviations from the NBD spec
    # (see the header of interop.py) are accepted instead of failing.
    qemu_quirks = False
    verbose = False


def log(msg):
    if Options.verbose:
        print("[interop] " + msg, file=sys.stderr, flush=True)


def note(msg):
    """Always printed: facts worth recording (e.g. which errno was chosen)."""
    print("note: " + msg, flush=True)


def fail(msg):
    raise CaseFailure(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def check_eq(what, expected, seen):
    if expected != seen:
        fail("%s:\n  expected: %r\n  seen:     %r" % (what, expected, seen))


def check_in(what, allowed, seen, quirk=None, fmt=repr):
    """``seen`` must be one of ``allowed``.

    ``quirk`` is ``(quirk_id, value)``: a documented qemu-nbd deviation.  With
    --qemu-quirks that value is accepted too (and noted); without it the
    failure message names the quirk so the reader knows why qemu-nbd fails.
    ``fmt`` renders values in messages.
    """
    if seen in allowed:
        return
    want = " or ".join(fmt(a) for a in allowed)
    if quirk is not None and seen == quirk[1]:
        if Options.qemu_quirks:
            note("%s: accepted %s under --qemu-quirks (%s); the spec wants %s"
                 % (what, fmt(seen), quirk[0], want))
            return
        fail("%s:\n  expected: %s\n  seen:     %s\n  (known qemu-nbd deviation"
             " %s, see the interop.py header; --qemu-quirks accepts it)"
             % (what, want, fmt(seen), quirk[0]))
    fail("%s:\n  expected: %s\n  seen:     %s" % (what, want, fmt(seen)))


def check_errno(what, allowed, seen, quirk=None):
    """Like check_in for errno numbers, printed by name (EINVAL, ...)."""
    check_in(what, allowed, seen, quirk, fmt=errno_name)


def errno_name(num):
    if num is None:
        return "None"
    if num == 0:
        return "0 (success)"
    return errno.errorcode.get(num, str(num))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def first_difference(a, b):
    """Offset of the first differing byte of two equal-length buffers."""
    n = min(len(a), len(b))
    for off in range(0, n, 4096):
        if a[off:off + 4096] != b[off:off + 4096]:
            for i in range(off, min(off + 4096, n)):
                if a[i] != b[i]:
                    return i
    return n if len(a) != len(b) else None


def check_bytes(what, expected, seen):
    """Compare two buffers without dumping megabytes into the message."""
    expected = bytes(expected)
    seen = bytes(seen)
    if expected == seen:
        return
    off = first_difference(expected, seen)
    fail("%s: data differs (expected %d bytes, saw %d bytes), first"
         " difference at byte %s:\n  expected: %s\n  seen:     %s"
         % (what, len(expected), len(seen), off,
            expected[off:off + 16].hex(), seen[off:off + 16].hex()))


# ---------------------------------------------------------------------------
# Images

def pattern(seed, length):
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def make_sparse_image(path, size, extents, seed=1):
    """Create a raw file of ``size`` bytes with data only in ``extents``.

    ``extents`` is a list of ``(offset, length)``; everything else is left as
    a hole (never written).  Offsets/lengths should be 64 KiB aligned so the
    holes survive any filesystem block size.  Returns the file contents as
    ``bytes`` (holes read as zeroes).
    """
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, length) in enumerate(extents):
            data = pattern(seed * 1000 + i, length)
            f.seek(off)
            f.write(data)
            content[off:off + length] = data
    return bytes(content)


def expected_map(size, extents):
    """base:allocation map for an image made by make_sparse_image.

    Returns merged ``[(offset, length, type)]`` where type 0 = data and
    3 = hole|zero.
    """
    out = []
    pos = 0
    for off, length in sorted(extents):
        if off > pos:
            out.append((pos, off - pos, 3))
        out.append((off, length, 0))
        pos = off + length
    if pos < size:
        out.append((pos, size - pos, 3))
    return merge_extents(out)


def merge_extents(extents):
    merged = []
    for off, length, typ in extents:
        if merged and merged[-1][2] == typ and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, typ)
        else:
            merged.append((off, length, typ))
    return merged


# The layout most cases use: 8 MiB, data and holes interleaved, data at both
# ends of the image.
STD_SIZE = 8 * MiB
STD_EXTENTS = [
    (0, 192 * KiB),
    (1 * MiB, 64 * KiB),
    (3 * MiB, 512 * KiB),
    (5 * MiB + 256 * KiB, 128 * KiB),
    (STD_SIZE - 128 * KiB, 128 * KiB),
]


# ---------------------------------------------------------------------------
# Subprocesses and servers

def _tail(path, limit=4000):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "(no stderr file)"
    text = data.decode("utf-8", "replace")
    if len(text) > limit:
        text = "...\n" + text[-limit:]
    return text.strip() or "(empty)"


def _polite_goodbye(s):
    """Best effort: read the greeting, answer it and send NBD_OPT_ABORT so
    the readiness probe does not fill the server's log with errors.  Any
    failure here is ignored; the cases test the handshake properly."""
    try:
        s.settimeout(5)
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                return
            greeting += chunk
        if greeting[:16] != b"NBDMAGICIHAVEOPT":
            return
        hflags = struct.unpack(">H", greeting[16:18])[0]
        s.sendall(struct.pack(">I", hflags & 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 2, 0))  # ABORT
        s.recv(20)
    except OSError:
        pass
    finally:
        s.close()


class Server:
    """One NBD server process listening on a unix socket."""

    def __init__(self, ctx, argv, sock, stderr_path, label, env=None):
        self.ctx = ctx
        self.argv = argv
        self.env = None if env is None else dict(os.environ, **env)
        self.sock = sock
        self.stderr_path = stderr_path
        self.label = label
        self.proc = None

    def start(self):
        log("start %s: %s" % (self.label, shlex.join(self.argv)))
        self._stderr = open(self.stderr_path, "wb")
        # A new session: if --server-cmd is a wrapper script we can still
        # stop the whole process group we created.
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr,
                stderr=self._stderr, start_new_session=True,
                cwd=self.ctx.tmpdir, env=self.env)
        except OSError as e:
            self._stderr.close()
            fail("cannot start %s: %s\n  command: %s"
                 % (self.label, e, shlex.join(self.argv)))

    def uri(self, name=""):
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)

    def stderr_text(self):
        return _tail(self.stderr_path)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, probe=True, timeout=SERVER_START_TIMEOUT):
        """Wait until the socket accepts connections.

        With ``probe=False`` only wait for the socket file to appear (used for
        non-persistent servers, where a probe connection would be the one
        client the server serves).
        """
        deadline = time.monotonic() + timeout
        last_err = "socket file never appeared"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                fail("%s exited early with status %s before accepting"
                     " connections\n  command: %s\n  stderr:\n%s"
                     % (self.label, rc, shlex.join(self.argv),
                        self.stderr_text()))
            if os.path.exists(self.sock):
                if not probe:
                    return
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(2)
                    s.connect(self.sock)
                except OSError as e:
                    last_err = str(e)
                    s.close()
                else:
                    _polite_goodbye(s)
                    return
            time.sleep(0.02)
        fail("%s did not accept connections on %s within %d s (%s)\n"
             "  command: %s\n  stderr:\n%s"
             % (self.label, self.sock, timeout, last_err,
                shlex.join(self.argv), self.stderr_text()))

    def wait_exit(self, timeout):
        """Return the exit status, or None if still running after timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """SIGTERM, then SIGKILL after 5 s.  Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SERVER_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                try:
                    self.proc.wait(timeout=SERVER_STOP_GRACE)
                except subprocess.TimeoutExpired:
                    pass
        else:
            # The leader is gone; make sure nothing it forked lingers.
            self._signal(signal.SIGKILL)
        try:
            self._stderr.close()
        except Exception:
            pass

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


class Context:
    """Per-case resources.  Use as a context manager."""

    def __init__(self, case_name):
        self.case_name = case_name
        self.tmpdir = tempfile.mkdtemp(prefix="strata-interop-%s-" % case_name,
                                       dir="/tmp")
        self.servers = []
        self._count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def path(self, name):
        return os.path.join(self.tmpdir, name)

    def close(self):
        for srv in self.servers:
            try:
                srv.stop()
            except Exception as e:  # keep cleaning up
                print("warning: stopping %s: %s" % (srv.label, e),
                      file=sys.stderr)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def server_stderr_report(self):
        parts = []
        for srv in self.servers:
            parts.append("--- %s stderr (%s) ---\n%s"
                         % (srv.label, shlex.join(srv.argv),
                            srv.stderr_text()))
        return "\n".join(parts)

    # -- servers ----------------------------------------------------------

    def start_server(self, image, *, persistent=True, readonly=False,
                     shared=None, name=None, desc=None, discard=None,
                     detect_zeroes=None, allocation_depth=False,
                     nocache_native=False, wait=True, probe=True,
                     fmt="raw", extra=(), env=None):
        """Start ``--server-cmd`` with qemu-nbd style options on ``image``.

        Returns a ready ``Server`` (unless ``wait=False``).
        """
        self._count += 1
        sock = self.path("nbd%d.sock" % self._count)
        args = ["-k", sock] + (["-f", fmt] if fmt else []) + list(extra)
        if persistent:
            args.append("-t")
        if readonly:
            args.append("-r")
        if shared is not None:
            args += ["-e", str(shared)]
        if name is not None:
            args += ["-x", name]
        if desc is not None:
            args += ["-D", desc]
        if discard is not None:
            args.append("--discard=%s" % discard)
        if detect_zeroes is not None:
            args.append("--detect-zeroes=%s" % detect_zeroes)
        if allocation_depth:
            args.append("-A")
        if nocache_native:
            args += ["--cache=none", "--aio=native"]
        argv = list(Options.server_cmd) + args + [image]
        srv = Server(self, argv, sock, self.path("server%d.stderr" % self._count),
                     "server #%d" % self._count, env=env)
        self.servers.append(srv)
        srv.start()
        if wait:
            srv.wait_ready(probe=probe)
        return srv

    # -- helper commands --------------------------------------------------

    def run(self, argv, *, timeout=DEFAULT_CMD_TIMEOUT, check=True,
            input=None, what=None):
        """Run a helper command with a timeout; fail clearly if it fails."""
        log("run: " + shlex.join(argv))
        try:
            res = subprocess.run(argv, input=input, capture_output=True,
                                 timeout=timeout, cwd=self.tmpdir)
        except subprocess.TimeoutExpired as e:
            fail("%s timed out after %s s: %s\n  stdout: %s\n  stderr: %s"
                 % (what or argv[0], timeout, shlex.join(argv),
                    (e.stdout or b"")[-2000:].decode("utf-8", "replace"),
                    (e.stderr or b"")[-2000:].decode("utf-8", "replace")))
        res.out = res.stdout.decode("utf-8", "replace")
        res.err = res.stderr.decode("utf-8", "replace")
        if check and res.returncode != 0:
            fail("%s failed (exit status %d): %s\n  stdout: %s\n  stderr: %s"
                 % (what or argv[0], res.returncode, shlex.join(argv),
                    res.out[-3000:].strip(), res.err[-3000:].strip()))
        return res

    def qemu_img_compare(self, a, b, what="qemu-img compare"):
        """``qemu-img compare -f raw -F raw a b`` must report identical."""
        res = self.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       check=False, what=what)
        if res.returncode != 0:
            fail("%s: expected the images to be identical (exit 0), got exit"
                 " %d\n  %s vs %s\n  stdout: %s\n  stderr: %s"
                 % (what, res.returncode, a, b, res.out.strip(),
                    res.err.strip()))

    def cmp_files(self, a, b, what="cmp"):
        res = self.run(["cmp", a, b], check=False, what=what)
        if res.returncode != 0:
            fail("%s: expected %s and %s to be byte-identical\n  cmp says: %s%s"
                 % (what, a, b, res.out.strip(), res.err.strip()))


# ---------------------------------------------------------------------------
# Case registry

CASES = {}


# Cases allowed longer than the default (seconds), by name: those bound by
# the disk's flush latency, which a busy or slow VM stretches.
CASE_TIMEOUTS = {}


def case_timeout(seconds):
    """Give the case below a longer watchdog limit than the default."""
    def register(fn):
        CASE_TIMEOUTS[fn.__name__] = seconds
        return fn
    return register


def case(fn):
    """Register ``fn(ctx)`` as a case named after the function."""
    if fn.__name__ in CASES:
        raise RuntimeError("duplicate case name " + fn.__name__)
    CASES[fn.__name__] = fn
    return fn
