#!/usr/bin/env python3
"""A Hugging Face Hub on 127.0.0.1 for benchmarks: serves one model folder as `org/name` in
the Hub's URL layout (`/{org}/{name}/resolve/{revision}/{file}`), with the Hub's headers
(`X-Repo-Commit`, `X-Linked-Etag` = sha256 for *.safetensors, `ETag` = git blob id for the
rest, `X-Linked-Size`) and byte ranges, and counts what it serves.

    python3 bench/local_hub.py MODEL_DIR PORT_FILE STATS_FILE

Writes its port to PORT_FILE once listening; rewrites STATS_FILE (JSON) after every request:
per file, the requests by kind (`meta`: bytes=0-0, `download`: a whole file or its rest,
`range`: a closed range) and bytes sent. Standard library only.
"""

import hashlib
import http.server
import json
import os
import sys
import threading

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT, PORT_FILE, STATS_FILE = sys.argv[1], sys.argv[2], sys.argv[3]
HASHES = {}
STATS = {}
LOCK = threading.Lock()


def etag(name):
    path = os.path.join(ROOT, name)
    if name not in HASHES:
        if name.endswith(".safetensors"):
            h = hashlib.sha256()
        else:
            h = hashlib.sha1()
            h.update(b"blob %d\0" % os.path.getsize(path))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        HASHES[name] = h.hexdigest()
    return HASHES[name]


class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle and delayed ACKs add ~40 ms
    # to every request.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.split("/", 5)
        if len(parts) != 6 or parts[3] != "resolve" or "/" in parts[5] or parts[5].startswith("."):
            return self.reply(404)
        name = parts[5]
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            return self.reply(404, name=name, kind="missing")
        size = os.path.getsize(path)
        start, end, kind = 0, size, "download"
        rng = self.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start = int(a)
            if b:
                end = int(b) + 1
                kind = "meta" if rng == "bytes=0-0" else "range"
        end = min(end, size)
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        lfs = name.endswith(".safetensors")
        self.send_header("X-Linked-Etag" if lfs else "ETag", '"%s"' % etag(name))
        if lfs:
            self.send_header("X-Linked-Size", str(size))
        if rng:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, size))
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                block = f.read(min(left, 1 << 20))
                self.wfile.write(block)
                left -= len(block)
        self.count(name, kind, end - start)

    def reply(self, status, name=None, kind=None):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if name:
            self.count(name, kind, 0)

    def count(self, name, kind, sent):
        with LOCK:
            s = STATS.setdefault(name, {"meta": 0, "download": 0, "range": 0, "missing": 0, "bytes": 0})
            s[kind] += 1
            s["bytes"] += sent
            with open(STATS_FILE + ".tmp", "w") as f:
                json.dump(STATS, f)
            os.replace(STATS_FILE + ".tmp", STATS_FILE)


# Hashed before listening, so a benchmark's timing does not include the Hub's own hashing.
for entry in sorted(os.listdir(ROOT)):
    if os.path.isfile(os.path.join(ROOT, entry)):
        etag(entry)
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client closing a kept-alive connection is not an error.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


server = Server(("127.0.0.1", 0), Hub)
with open(STATS_FILE, "w") as f:
    json.dump({}, f)
with open(PORT_FILE, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
