"""Heartbeats between the processes of a multi-process run, so that a lost process is named in one line.

Process 0 listens on the coordinator's host at the coordinator's port + 1 (TCP); every other process connects and
sends a beat each second, and process 0 answers each second. Process 0 declares a peer lost after ``limit`` seconds
without its beat, tells the others which one, and each process then calls ``on_lost(peer, why)``; a peer that hears
nothing from process 0 for ``limit`` seconds declares process 0 lost. Only the standard library: JAX's coordination
service has a key-value store and heartbeats of its own, but no public Python interface to them.
"""
from __future__ import annotations

import select
import socket
import threading
import time


class Heartbeat:
    """The heartbeat of process ``me`` of ``count``; ``start()`` runs it in daemon threads, ``stop()`` ends it."""

    def __init__(self, me: int, count: int, host: str, port: int, limit: float, on_lost):
        self.me, self.count, self.host, self.port, self.limit = me, count, host, port, limit
        self.on_lost = on_lost
        self.done = threading.Event()
        self._peers: dict[int, socket.socket] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.me == 0:
            server = socket.create_server((self.host, self.port))
            server.settimeout(1.0)
            threading.Thread(target=self._serve, args=(server,), daemon=True, name="jaxconv-heartbeat").start()
        else:
            threading.Thread(target=self._beat, daemon=True, name="jaxconv-heartbeat").start()

    def stop(self) -> None:
        self.done.set()

    def _lost(self, peer: int, why: str) -> None:
        if not self.done.is_set():
            self.done.set()
            self.on_lost(peer, why)

    # ----------------------------------------------------------------------------------------------- process 0

    def _serve(self, server: socket.socket) -> None:
        start = time.monotonic()
        heard = {p: start for p in range(1, self.count)}
        threading.Thread(target=self._watch, args=(heard,), daemon=True, name="jaxconv-heartbeat-watch").start()
        with server:
            while not self.done.is_set():
                try:
                    conn, _ = server.accept()
                except (socket.timeout, OSError):
                    continue
                threading.Thread(target=self._listen, args=(conn, heard), daemon=True).start()

    def _listen(self, conn: socket.socket, heard: dict) -> None:
        buffer = b""
        with conn:
            while not self.done.is_set():
                data = _receive(conn)
                if data is None:
                    continue
                if not data:
                    return  # closed: the peer is judged by its silence from here on
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    peer = int(line.split()[1])
                    heard[peer] = time.monotonic()
                    with self._lock:
                        self._peers[peer] = conn

    def _watch(self, heard: dict) -> None:
        while not self.done.wait(1.0):
            now = time.monotonic()
            with self._lock:
                conns = list(self._peers.items())
            for peer, conn in conns:
                _send(conn, b"ok\n")
            for peer, last in list(heard.items()):
                if now - last > self.limit:
                    why = f"no heartbeat for {now - last:.0f} s"
                    for other, conn in conns:
                        if other != peer:
                            _send(conn, f"lost {peer} {why}\n".encode())
                    self._lost(peer, why)
                    return

    # ----------------------------------------------------------------------------------------- the other processes

    def _beat(self) -> None:
        start = last = time.monotonic()
        conn = None
        while conn is None and not self.done.is_set():
            try:
                conn = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError:
                if time.monotonic() - start > self.limit:
                    return self._lost(0, f"its heartbeat port {self.host}:{self.port} did not answer")
                time.sleep(0.2)
        buffer = b""
        with conn:
            while not self.done.is_set():
                data = _receive(conn) if _send(conn, f"beat {self.me}\n".encode()) else b""
                if data == b"":  # the connection is gone: process 0 is judged by its silence
                    time.sleep(1.0)
                now = time.monotonic()
                if data:
                    last = now
                    *lines, buffer = (buffer + data).split(b"\n")
                    for line in lines:
                        if line.startswith(b"lost "):
                            _, peer, why = line.decode().split(" ", 2)
                            return self._lost(int(peer), why)
                if now - last > self.limit:
                    return self._lost(0, f"no heartbeat for {now - last:.0f} s")


def _receive(conn: socket.socket, timeout: float = 1.0) -> bytes | None:
    """What arrived within ``timeout`` seconds: ``None`` for nothing, ``b""`` for a closed connection."""
    try:
        ready, _, _ = select.select([conn], [], [], timeout)
        return conn.recv(4096) if ready else None
    except OSError:
        return b""


def _send(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return True
    except OSError:
        return False
