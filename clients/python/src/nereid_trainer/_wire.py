"""Frames of the trainer protocol: u32 LE header length, JSON header, u64 LE payload length,
payload (safetensors bytes or nothing)."""
import json
import socket
import struct

from .errors import EdgeGone, ProtocolError

MAX_HEADER = 1 << 20


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EdgeGone("the edge closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def write_frame(sock: socket.socket, message: dict, payload: bytes = b"") -> None:
    try:
        header = json.dumps(message, allow_nan=False).encode()
    except ValueError as e:
        raise ProtocolError(f"a message value is not a finite number: {e}") from None
    sock.sendall(struct.pack("<I", len(header)) + header + struct.pack("<Q", len(payload)))
    if payload:
        sock.sendall(payload)


def read_frame(sock: socket.socket) -> "tuple[dict, bytes]":
    (n,) = struct.unpack("<I", _read_exact(sock, 4))
    if n > MAX_HEADER:
        raise ProtocolError(f"a header of {n} bytes: not a frame of the trainer protocol")
    message = json.loads(_read_exact(sock, n))
    (m,) = struct.unpack("<Q", _read_exact(sock, 8))
    return message, _read_exact(sock, m) if m else b""
