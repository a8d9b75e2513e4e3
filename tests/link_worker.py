"""Traffic for tests/test_links.py: a sink that times what it receives,
and a source that sends N bytes.

    python link_worker.py sink PORT SENDERS   # prints one JSON line
    python link_worker.py source ADDRESS PORT NBYTES
"""

import json
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def sink(port: int, senders: int) -> None:
    server = socket.create_server(("0.0.0.0", port))
    print("READY", flush=True)
    times, total, lock = [], [0], threading.Lock()

    def drain(conn):
        with conn:
            while data := conn.recv(CHUNK):
                now = time.monotonic()
                with lock:
                    times.append(now)
                    total[0] += len(data)

    threads = []
    for _ in range(senders):
        conn, _ = server.accept()
        threads.append(threading.Thread(target=drain, args=(conn,)))
        threads[-1].start()
    for t in threads:
        t.join()
    print(json.dumps({"bytes": total[0],
                      "seconds": max(times) - min(times)}), flush=True)


def source(address: str, port: int, nbytes: int) -> None:
    payload = b"\0" * CHUNK
    with socket.create_connection((address, port), timeout=60) as conn:
        sent = 0
        while sent < nbytes:
            conn.sendall(payload)
            sent += len(payload)


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(int(sys.argv[2]), int(sys.argv[3]))
    else:
        source(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
