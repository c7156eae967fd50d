#!/usr/bin/env python3
"""What a user listing costs the server with many users online (issue 11, item 2).

Connects N guests speaking protocol version 1 (raw frames, standard library only), asks for one
listing and reports its bytes, frames and users, then asks for listings as fast as they are
answered for 3 s and reports the bytes sent back. Start a server first, for example
`target/release/relay-server --port 18095 --auth none --data-dir $(mktemp -d)`, raise the open
file limit (`ulimit -n 20000`), then run `python3 bench/listing_cost.py 5000 [PORT]`.
Not a test.
"""
import socket
import struct
import sys
import time
def msg(version, id_, kind, register, exit_, to=b"", frm=b"", content=b""):
    body = struct.pack("<HQI", version, id_, kind) + bytes([register, exit_])
    for f in (to, frm, content):
        body += struct.pack("<Q", len(f)) + f
    return struct.pack(">I", len(body)) + body
def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def recv_frame(s):
    n = struct.unpack(">I", recv_exact(s, 4))[0]
    return recv_exact(s, n)
def content(body):
    off = 14 + 2
    parts = []
    for _ in range(3):
        n = struct.unpack("<Q", body[off:off+8])[0]; off += 8
        parts.append(body[off:off+n]); off += n
    return parts
N = int(sys.argv[1])
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 18095
socks = []
for i in range(N):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.sendall(msg(1, 1, 0, 1, 0, frm=b"user%05d" % i))
    socks.append(s)
for s in socks:
    recv_frame(s)
s = socks[0]
def listing(id_):
    s.sendall(msg(1, id_, 1, 0, 0))
    total = 0; frames = 0; users = 0
    while True:
        b = recv_frame(s)
        frames += 1; total += len(b) + 4
        to, frm, c = content(b)
        users += c.count(b"\n")
        if c.endswith(b"\n\n") or c == b"\n":
            return total, frames, users - 1
print("first listing:", listing(2))
t = time.time(); n = 0; got = 0
while time.time() - t < 3:
    n += 1
    s.sendall(msg(1, 100 + n, 1, 0, 0))
    b = recv_frame(s)
    kind = struct.unpack("<I", b[10:14])[0]
    if kind == 2:
        # drain the page
        to, frm, c = content(b); got += len(b) + 4
        while not (c.endswith(b"\n\n") or c == b"\n"):
            b = recv_frame(s); got += len(b) + 4; to, frm, c = content(b)
    else:
        got += len(b) + 4
print("3 s of listings as fast as answered: %d requests, %d bytes back (%.0f bytes/s)" % (n, got, got / 3))
