import Foundation
import Testing

// Hostile and broken clients, speaking raw NBD over a Unix socket from Python: each case
// must get the right NBD error or a clean disconnect, and the server must keep serving
// new clients afterwards (checked by a fresh client at the end of every case).

@Suite("NBD protocol abuse")
struct AbuseTests {
    static let cases: [(name: String, readOnly: Bool)] = [
        ("bad_client_flags", false),
        ("bad_option_magic", false),
        ("oversized_option", false),
        ("absurd_option_length", false),
        ("option_errors", false),
        ("list_and_abort", false),
        ("export_name_unknown", false),
        ("bad_request_magic", false),
        ("request_errors", false),
        ("request_errors_simple", false),
        ("oversized_write", false),
        ("read_only_errors", true),
        ("abrupt_disconnects", false),
        ("pipelined", false),
        ("backpressure", true),
        ("garbage", false),
    ]

    @Test("Abuse case", arguments: cases.map(\.name))
    func abuse(_ name: String) async throws {
        let readOnly = Self.cases.first { $0.name == name }?.readOnly ?? false
        try await withTempDir("abuse-\(name)") { dir in
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "a.qcow2", "64M"], cwd: dir)
            try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 60M 4M", "a.qcow2"], cwd: dir)
            let args = (readOnly ? ["-r"] : []) + ["-t", "-e", "0", "--handshake-limit", "5"]
            try await withServer(args, image: "a.qcow2", listen: .unix, dir: dir) { server in
                let socket = try #require(server.socket)
                let r = try await runPython(abuseScript, [name, socket, String(server.pid)], dir: dir, timeout: 90)
                #expect(r.succeeded && r.stdout.contains("CASE OK"), "\(r)")
                #expect(server.isAlive, "the server died")
                // A well-behaved client is still served.
                let after = try await run("nbdinfo", ["--size", server.uri], cwd: dir)
                #expect(after.succeeded && after.stdout.contains("67108864"), "\(after)")
            }
            let check = try await run("qemu-img", ["check", "a.qcow2"], cwd: dir)
            #expect(check.succeeded, "\(check)")
        }
    }

    @Test("A client that stalls in the handshake is disconnected after --handshake-limit")
    func handshakeLimit() async throws {
        try await withTempDir("abuse-stall") { dir in
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"], cwd: dir)
            try await withServer(["-r", "-t", "--handshake-limit", "1"], image: "a.qcow2", listen: .unix, dir: dir) { server in
                let socket = try #require(server.socket)
                let r = try await runPython(abuseScript, ["stall", socket, String(server.pid)], dir: dir)
                #expect(r.succeeded && r.stdout.contains("CASE OK"), "\(r)")
            }
        }
    }
}

let abuseScript = #"""
import os, socket, struct, sys, time

CASE, SOCK, PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003e889045565a9
REQ_MAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668e33ef
ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000001, 0x80000002, 0x80000003, 0x80000006, 0x80000009
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
SIZE = 64 << 20

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(SOCK)
    return s

def recvall(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(min(n - len(out), 1 << 20))
        if not b:
            raise EOFError("connection closed after %d of %d bytes" % (len(out), n))
        out += b
    return bytes(out)

def expect_closed(s, what):
    s.settimeout(10)
    try:
        while True:
            b = s.recv(65536)
            if not b:
                return
    except (ConnectionResetError, BrokenPipeError):
        return
    except socket.timeout:
        raise SystemExit("server did not close the connection: " + what)

def greet(s, flags=3):
    g = recvall(s, 18)
    assert g[:16] == b"NBDMAGICIHAVEOPT", g
    assert struct.unpack(">H", g[16:])[0] == 3
    s.sendall(struct.pack(">I", flags))

def opt(s, code, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

def opt_reply(s):
    magic, code, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    assert magic == REP_MAGIC, hex(magic)
    return code, typ, recvall(s, ln)

def final_reply(s, code):
    """Reads option replies until the final one; returns (type, [intermediate replies])."""
    seen = []
    while True:
        c, typ, data = opt_reply(s)
        assert c == code, (c, code)
        if typ in (SERVER, INFO, META):
            seen.append((typ, data))
            continue
        return typ, seen

def go(s, name=b"disk", structured=True, contexts=()):
    if structured:
        opt(s, 8)
        assert final_reply(s, 8)[0] == ACK
    if contexts:
        q = b"".join(struct.pack(">I", len(c)) + c for c in contexts)
        opt(s, 10, struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + q)
        typ, seen = final_reply(s, 10)
        assert typ == ACK and len(seen) == len(contexts), (typ, seen)
    opt(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 1) + struct.pack(">H", 3))
    typ, seen = final_reply(s, 7)
    assert typ == ACK, hex(typ)
    for t, data in seen:
        if data[:2] == b"\0\0":
            return struct.unpack(">QH", data[2:])
    raise SystemExit("no NBD_INFO_EXPORT")

def request(s, typ, offset, length, cookie, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, offset, length) + payload)

def reply(s, readlen=0):
    """One reply: ('simple', cookie, error, data) or ('structured', cookie, error, chunks)."""
    magic = struct.unpack(">I", recvall(s, 4))[0]
    if magic == SIMPLE:
        err, cookie = struct.unpack(">IQ", recvall(s, 12))
        data = recvall(s, readlen) if err == 0 and readlen else b""
        return "simple", cookie, err, data
    assert magic == STRUCT, hex(magic)
    chunks, err, cookie = [], 0, None
    while True:
        flags, typ, ck, ln = struct.unpack(">HHQI", recvall(s, 16))
        payload = recvall(s, ln)
        assert cookie is None or ck == cookie
        cookie = ck
        if typ & 0x8000:
            err = struct.unpack(">I", payload[:4])[0]
            mlen = struct.unpack(">H", payload[4:6])[0]
            assert mlen <= len(payload) - 6 and mlen <= 1000
        chunks.append((typ, payload))
        if flags & 1:
            return "structured", cookie, err, chunks
        magic = struct.unpack(">I", recvall(s, 4))[0]
        assert magic == STRUCT

def read_data(chunks, offset, length):
    buf = bytearray(length)
    for typ, p in chunks:
        if typ == 1:
            o = struct.unpack(">Q", p[:8])[0] - offset
            buf[o:o + len(p) - 8] = p[8:]
        elif typ == 2:
            o, n = struct.unpack(">QI", p)
            assert 0 <= o - offset and o - offset + n <= length
    return bytes(buf)

def expect_error(s, err, readlen=0, cookie=None, what=""):
    kind, ck, e, _ = reply(s, readlen)
    assert e == err, "%s: expected error %d, got %d" % (what, err, e)
    if cookie is not None:
        assert ck == cookie, (ck, cookie)

def check_read(s, offset, length, byte, cookie=77):
    request(s, READ, offset, length, cookie)
    kind, ck, err, data = reply(s, length)
    assert err == 0 and ck == cookie, (err, ck)
    if kind == "structured":
        data = read_data(data, offset, length)
    assert data == bytes([byte]) * length, "content mismatch at %d" % offset

def good_session(structured=True):
    s = connect()
    greet(s)
    go(s, structured=structured)
    check_read(s, 0, 4096, 0xaa)
    request(s, DISC, 0, 0, 1)
    expect_closed(s, "after DISC")

# ---------------------------------------------------------------------------

def case_bad_client_flags():
    s = connect()
    recvall(s, 18)
    s.sendall(struct.pack(">I", 0x80000001))
    expect_closed(s, "unknown client flags")

def case_bad_option_magic():
    s = connect()
    greet(s)
    s.sendall(b"NOTMAGIC" + struct.pack(">II", 7, 0))
    expect_closed(s, "bad option magic")

def case_oversized_option():
    s = connect()
    greet(s)
    opt(s, 7, b"\x00" * 100000)
    c, typ, data = opt_reply(s)
    assert c == 7 and typ == ERR_TOO_BIG, hex(typ)
    # Still in sync: negotiate normally.
    go(s)
    check_read(s, 0, 4096, 0xaa)
    s.close()

def case_absurd_option_length():
    s = connect()
    greet(s)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFF0) + b"\x00" * 1000)
    expect_closed(s, "absurd option length")

def case_option_errors():
    s = connect()
    greet(s)
    opt(s, 99, b"abc")
    assert final_reply(s, 99)[0] == ERR_UNSUP
    opt(s, 5)                                   # STARTTLS
    assert final_reply(s, 5)[0] in (ERR_POLICY, ERR_UNSUP)
    opt(s, 11)                                  # EXTENDED_HEADERS
    assert final_reply(s, 11)[0] == ERR_UNSUP
    opt(s, 4)                                   # PEEK_EXPORT
    assert final_reply(s, 4)[0] == ERR_UNSUP
    q = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
    opt(s, 10, q)                               # SET_META_CONTEXT before structured replies
    assert final_reply(s, 10)[0] == ERR_INVALID
    opt(s, 3, b"x")                             # LIST with data
    assert final_reply(s, 3)[0] == ERR_INVALID
    opt(s, 7, b"\x00\x00")                      # GO, truncated
    assert final_reply(s, 7)[0] == ERR_INVALID
    opt(s, 7, struct.pack(">I", 1000) + b"disk" + b"\0\0")   # name length past the data
    assert final_reply(s, 7)[0] == ERR_INVALID
    opt(s, 6, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 5) + b"\0\0")  # info count past the data
    assert final_reply(s, 6)[0] == ERR_INVALID
    opt(s, 7, struct.pack(">I", 4) + b"nope" + b"\0\0")      # unknown export
    assert final_reply(s, 7)[0] == ERR_UNKNOWN
    opt(s, 8, b"x")                             # STRUCTURED_REPLY with data
    assert final_reply(s, 8)[0] == ERR_INVALID
    opt(s, 8)
    assert final_reply(s, 8)[0] == ACK
    opt(s, 8)                                   # twice
    assert final_reply(s, 8)[0] == ERR_INVALID
    bad = struct.pack(">I", 4) + b"disk" + struct.pack(">I", 2) + struct.pack(">I", 0xFFFF) + b"base:allocation"
    opt(s, 9, bad)                              # query length overruns
    assert final_reply(s, 9)[0] == ERR_INVALID
    opt(s, 9, q + b"trailing")
    assert final_reply(s, 9)[0] == ERR_INVALID
    opt(s, 9, struct.pack(">I", 4) + b"nope" + struct.pack(">I", 0))
    assert final_reply(s, 9)[0] == ERR_UNKNOWN
    # LIST_META_CONTEXT: all, wildcard, unknown namespace.
    opt(s, 9, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    typ, seen = final_reply(s, 9)
    assert typ == ACK and [d[4:] for _, d in seen] == [b"base:allocation"], seen
    qs = [b"base:", b"other:thing", b"qemu:allocation-depth"]
    opt(s, 9, struct.pack(">I", 4) + b"disk" + struct.pack(">I", len(qs)) + b"".join(struct.pack(">I", len(x)) + x for x in qs))
    typ, seen = final_reply(s, 9)
    assert typ == ACK and [d[4:] for _, d in seen] == [b"base:allocation"], seen
    # SET with wildcard selects nothing; exact name selects it.
    opt(s, 10, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 5) + b"base:")
    typ, seen = final_reply(s, 10)
    assert typ == ACK and seen == [], seen
    size, flags = go(s, structured=False, contexts=[b"base:allocation"])
    assert size == SIZE and flags & 1 and flags & 0x100 and flags & 0x80, hex(flags)
    request(s, BLOCK_STATUS, 0, SIZE, 5)
    kind, ck, err, chunks = reply(s)
    assert err == 0 and chunks[0][0] == 5, chunks
    ext = struct.unpack(">I" + "II" * ((len(chunks[0][1]) - 4) // 8), chunks[0][1])
    assert ext[1:5] == (1 << 20, 0, (60 << 20) - (1 << 20), 3), ext
    check_read(s, 0, 4096, 0xaa)
    s.close()

def case_list_and_abort():
    s = connect()
    greet(s)
    opt(s, 3)
    typ, seen = final_reply(s, 3)
    assert typ == ACK and len(seen) == 1 and seen[0][1][4:8] == b"disk", seen
    opt(s, 6, struct.pack(">I", 0) + struct.pack(">H", 0))   # INFO on the default export
    typ, seen = final_reply(s, 6)
    assert typ == ACK and any(d[:2] == b"\0\0" for _, d in seen)
    opt(s, 2)
    assert final_reply(s, 2)[0] == ACK
    expect_closed(s, "after ABORT")

def case_export_name_unknown():
    s = connect()
    greet(s)
    opt(s, 1, b"nope")
    expect_closed(s, "EXPORT_NAME of an unknown export")
    s = connect()
    greet(s, flags=0)
    opt(s, 1, b"disk")
    data = recvall(s, 8 + 2 + 124)
    size, flags = struct.unpack(">QH", data[:10])
    assert size == SIZE and data[10:] == bytes(124)
    check_read(s, 0, 512, 0xaa)
    s.close()

def case_bad_request_magic():
    s = connect()
    greet(s)
    go(s)
    s.sendall(struct.pack(">IHHQQI", 0x12560953, 0, READ, 1, 0, 4096))
    expect_closed(s, "bad request magic")
    s = connect()
    greet(s)
    go(s)
    opt(s, 3)                                   # an option during transmission
    expect_closed(s, "option during transmission")

def request_errors(structured):
    s = connect()
    greet(s)
    go(s, structured=structured)
    def err(typ, offset, length, code, flags=0, payload=b"", what=""):
        request(s, typ, offset, length, 9, flags, payload)
        expect_error(s, code, cookie=9, what=what)
    err(READ, SIZE - 2048, 4096, 22, what="read past the end")
    err(READ, SIZE, 1, 22, what="read at the end")
    err(READ, 2**64 - 512, 1024, 22, what="read with offset overflow")
    err(READ, 0, (32 << 20) + 1, 75, what="read too large")
    err(WRITE, SIZE - 100, 200, 28, payload=b"w" * 200, what="write past the end")
    err(ZEROES, SIZE - 100, 200, 28, what="write zeroes past the end")
    err(TRIM, SIZE, 4096, 22, what="trim past the end")
    err(CACHE, SIZE, 4096, 22, what="cache past the end")
    err(42, 0, 4096, 22, what="unknown command")
    err(READ, 0, 4096, 22, flags=0x8, what="REQ_ONE on READ")
    err(READ, 0, 4096, 22, flags=0x40, what="unknown flag")
    err(WRITE, 0, 4, 22, flags=0x2, payload=b"abcd", what="NO_HOLE on WRITE")
    err(BLOCK_STATUS, 0, 4096, 22, what="block status without a context")
    if not structured:
        err(READ, 0, 4096, 22, flags=0x4, what="DF without structured replies")
    # Zero-length requests.
    request(s, READ, 0, 0, 10)
    kind, ck, e, _ = reply(s, 0)
    assert e == 0 and ck == 10
    request(s, WRITE, 0, 0, 11)
    kind, ck, e, _ = reply(s)
    assert e == 0 and ck == 11
    # The stream is still in sync and the data intact.
    check_read(s, 0, 8192, 0xaa)
    check_read(s, 60 << 20, 4096, 0xbb)
    request(s, FLUSH, 0, 0, 12)
    assert reply(s)[2] == 0
    request(s, DISC, 0, 0, 13)
    expect_closed(s, "after DISC")

def case_request_errors():
    request_errors(True)

def case_request_errors_simple():
    request_errors(False)

def case_oversized_write():
    s = connect()
    greet(s)
    go(s)
    n = (32 << 20) + 4096
    request(s, WRITE, 0, n, 21, payload=b"\x99" * n)
    expect_error(s, 22, cookie=21, what="write larger than the maximum")
    check_read(s, 0, 4096, 0xaa)               # skipped payload, nothing written
    s.close()

def case_read_only_errors():
    s = connect()
    greet(s)
    size, flags = go(s)
    assert flags & 2, "export not read-only"
    request(s, WRITE, 0, 4096, 31, payload=b"\x11" * 4096)
    expect_error(s, 1, cookie=31, what="write on read-only")
    request(s, TRIM, 0, 4096, 32)
    expect_error(s, 1, cookie=32, what="trim on read-only")
    request(s, ZEROES, 0, 4096, 33)
    expect_error(s, 1, cookie=33, what="zero on read-only")
    request(s, ZEROES, 0, 4096, 34, flags=0x10)
    expect_error(s, 22, cookie=34, what="fast zero not advertised")
    request(s, FLUSH, 0, 0, 35)
    assert reply(s)[2] == 0
    check_read(s, 0, 4096, 0xaa)
    s.close()

def case_abrupt_disconnects():
    # Mid-handshake, after the greeting.
    s = connect(); recvall(s, 18); s.close()
    # Half an option header.
    s = connect(); greet(s); s.sendall(struct.pack(">Q", IHAVEOPT) + b"\0\0"); s.close()
    # Half the option data.
    s = connect(); greet(s); s.sendall(struct.pack(">QII", IHAVEOPT, 7, 100) + b"\0" * 10); s.close()
    # A WRITE header and half its payload.
    s = connect(); greet(s); go(s)
    request(s, WRITE, 1 << 20, 1 << 20, 1, payload=b"\x42" * (512 << 10)); s.close()
    # Half a request header.
    s = connect(); greet(s); go(s); s.sendall(struct.pack(">IHH", REQ_MAGIC, 0, READ)); s.close()
    # Many reads in flight, then gone without reading replies (and RST with SO_LINGER 0).
    for linger in (False, True):
        s = connect(); greet(s); go(s)
        s.sendall(b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, READ, i, (i % 60) << 20, 1 << 20) for i in range(64)))
        if linger:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    # Writes in flight, then gone.
    s = connect(); greet(s); go(s)
    for i in range(16):
        request(s, WRITE, (2 + i) << 20, 65536, 100 + i, payload=bytes([i]) * 65536)
    s.close()
    time.sleep(0.5)
    good_session()
    good_session(structured=False)

def case_pipelined():
    s = connect()
    greet(s)
    go(s)
    n = 300
    reqs = []
    for i in range(n):
        if i % 3 == 0:
            reqs.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, WRITE, 1000 + i, (8 << 20) + i * 12288, 4096) + bytes([i % 251]) * 4096)
        else:
            reqs.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, READ, 1000 + i, (i % 2) * (60 << 20), 4096))
    # Send everything from a second thread while this one reads the replies (a client that
    # stops reading while it writes would deadlock against the server's backpressure).
    import threading
    sender = threading.Thread(target=lambda: s.sendall(b"".join(reqs)))
    sender.start()
    seen = set()
    for _ in range(n):
        kind, ck, err, chunks = reply(s)       # structured: READ data comes in chunks
        assert err == 0 and 1000 <= ck < 1000 + n and ck not in seen, (ck, err)
        seen.add(ck)
        i = ck - 1000
        if i % 3 != 0:
            data = read_data(chunks, (i % 2) * (60 << 20), 4096)
            assert data == bytes([0xaa if i % 2 == 0 else 0xbb]) * 4096
    sender.join()
    for i in range(0, n, 3):
        check_read(s, (8 << 20) + i * 12288, 4096, i % 251)
    s.close()

def rss_kib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def case_backpressure():
    # 2 GiB of READ replies requested, none read: the server must stop reading requests
    # instead of buffering replies.
    s = connect()
    greet(s)
    go(s)
    s.setblocking(False)
    batch = b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, READ, i, ((i % 32) * 2) << 20, 1 << 20) for i in range(2048))
    sent = 0
    deadline = time.time() + 5
    while sent < len(batch) and time.time() < deadline:
        try:
            sent += s.send(batch[sent:])
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(1.0)
    rss = rss_kib(PID)
    assert rss < 400 * 1024, "server RSS %d KiB while a client does not read its replies" % rss
    s.setblocking(True)
    s.settimeout(20)
    # The replies do arrive once the client reads.
    kind, ck, err, chunks = reply(s, 1 << 20)
    assert err == 0
    s.close()
    print("rss KiB", rss, "requests sent", sent // 28)

def case_garbage():
    import random
    rnd = random.Random(1234)
    for i in range(20):
        s = connect()
        try:
            if i % 2:
                greet(s)
                if i % 4 == 3:
                    go(s)
            else:
                recvall(s, 18)
            s.sendall(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 2000))))
            s.settimeout(1)
            try:
                while s.recv(65536):
                    pass
            except (socket.timeout, ConnectionResetError):
                pass
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass
        s.close()
    good_session()

def case_stall():
    s = connect()
    recvall(s, 18)
    t = time.time()
    expect_closed(s, "stalled handshake")
    assert time.time() - t < 8, "handshake limit not applied"

globals()["case_" + CASE]()
print("CASE OK")
"""#
