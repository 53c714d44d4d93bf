"""A fake SNMP v2c device that counts how often each job was executed at it.

Each fault-scenario job asks for its own OID (`oid_for(n)`), so the device can count the
executions of every job: the distinct (OID, request id) pairs it was asked for. A retransmission
of one request (same request id) counts once. It answers every GET after `delay` seconds with
an OctetString, from a thread of the test process, on a free 127.0.0.1 UDP port.

Only the few BER forms a GET needs are parsed (SEQUENCE, INTEGER, OCTET STRING, OID, NULL and
the PDU tags); anything else is counted in `garbage` and not answered.
"""

from __future__ import annotations

import contextlib
import heapq
import socket
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Self

__all__ = ["BASE_OID", "CountingAgent", "oid_for"]

#: Jobs of the scenarios ask for `BASE_OID.<n>` (a private enterprise arc).
BASE_OID = "1.3.6.1.4.1.99999.17"

_SEQ, _INT, _OCTETS, _NULL, _OID = 0x30, 0x02, 0x04, 0x05, 0x06
_GET, _RESPONSE = 0xA0, 0xA2


def oid_for(n: int) -> str:
    return f"{BASE_OID}.{n}"


def _read(data: bytes, i: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the TLV at `i`."""
    tag = data[i]
    length = data[i + 1]
    i += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 3:
            raise ValueError("length form")
        length = int.from_bytes(data[i : i + n], "big")
        i += n
    end = i + length
    if end > len(data):
        raise ValueError("truncated")
    return tag, i, end


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + value


def _decode_oid(raw: bytes) -> str:
    first = raw[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def parse_get(data: bytes) -> tuple[bytes, bytes, bytes, list[bytes]]:
    """(version TLV, community TLV, request id TLV, raw OID TLVs) of a GET request."""
    tag, start, end = _read(data, 0)
    if tag != _SEQ:
        raise ValueError("not a message")
    _, v_start, v_end = _read(data, start)
    version = data[start:v_end]
    _, _c_start, c_end = _read(data, v_end)
    community = data[v_end:c_end]
    pdu_tag, p_start, p_end = _read(data, c_end)
    if pdu_tag != _GET:
        raise ValueError("not a GET")
    _, _r_start, r_end = _read(data, p_start)
    request_id = data[p_start:r_end]
    _, _, s_end = _read(data, r_end)  # error status
    _, _, i_end = _read(data, s_end)  # error index
    _, vbl_start, vbl_end = _read(data, i_end)
    oids = []
    i = vbl_start
    while i < vbl_end:
        _, vb_start, vb_end = _read(data, i)
        _, _, o_end = _read(data, vb_start)
        oids.append(data[vb_start:o_end])
        i = vb_end
    del v_start, end, p_end
    return version, community, request_id, oids


def response(version: bytes, community: bytes, request_id: bytes, oids: list[bytes]) -> bytes:
    zero = _tlv(_INT, b"\x00")
    varbinds = b"".join(_tlv(_SEQ, oid + _tlv(_OCTETS, b"done")) for oid in oids)
    pdu = _tlv(_RESPONSE, request_id + zero + zero + _tlv(_SEQ, varbinds))
    return _tlv(_SEQ, version + community + pdu)


class CountingAgent:
    """`with CountingAgent(delay=0.02) as agent:` answers on `agent.port` until the block ends."""

    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1") -> None:
        self.delay = delay
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self.port: int = self._sock.getsockname()[1]
        self._seen: set[tuple[str, bytes]] = set()
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.requests = 0
        self.garbage = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="counting-agent", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def executions(self) -> dict[str, int]:
        """Executions per OID so far."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def _serve(self) -> None:
        due: list[tuple[float, int, bytes, tuple[str, int]]] = []
        n = 0
        while not self._stop.is_set():
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, payload, addr = heapq.heappop(due)
                with contextlib.suppress(OSError):
                    self._sock.sendto(payload, addr)
            wait = 0.05 if not due else max(0.0, min(0.05, due[0][0] - now))
            self._sock.settimeout(wait or 0.0001)
            try:
                data, addr = self._sock.recvfrom(65535)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.requests += 1
            try:
                version, community, request_id, oids = parse_get(data)
            except (ValueError, IndexError):
                self.garbage += 1
                continue
            with self._lock:
                for raw in oids:
                    oid = _decode_oid(raw[2:])
                    key = (oid, request_id)
                    if key not in self._seen:
                        self._seen.add(key)
                        self._counts[oid] += 1
            n += 1
            heapq.heappush(
                due,
                (now + self.delay, n, response(version, community, request_id, oids), addr),
            )
