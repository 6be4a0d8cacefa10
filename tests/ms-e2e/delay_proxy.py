"""A TCP relay that adds latency, for scripts/ms-e2e's MS_E2E_MQTT_DELAY_MS.

    python3 delay_proxy.py PORT_FILE TARGET_PORT RTT_MS

Listens on 127.0.0.1 (a free port, written to PORT_FILE once listening) and relays every
connection to 127.0.0.1:TARGET_PORT (the hub's MQTT port), holding each chunk RTT_MS/2 in each
direction, so every round trip through it (TCP handshake aside, TLS handshake, CONNECT/CONNACK,
PUBLISH/PUBACK) takes RTT_MS longer, as it does between a device and IoT Hub in Azure. The
order of the bytes is kept and nothing is changed in them. It runs until it is killed.

Why it exists: against the local hub a reconnect (DISCONNECT, TCP, TLS, CONNECT, CONNACK) takes
a few milliseconds, against Azure tens to hundreds; docs/ms-e2e.md shows a test of Microsoft's
suite whose outcome depends on that. With this relay the suite can be run both ways.

Only the standard library; not used by scripts/test.
"""

import asyncio
import os
import sys
import time


async def _pump(reader, writer, delay):
    """Copies reader to writer, each chunk `delay` seconds after it was read; in order."""
    queue = asyncio.Queue()  # unbounded: bounded by what the peer sends in `delay` seconds

    async def read():
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + delay, chunk))
                if not chunk:
                    return
        except (ConnectionError, OSError):
            queue.put_nowait((time.monotonic() + delay, b""))

    async def write():
        try:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    reading = asyncio.ensure_future(read())
    await write()
    reading.cancel()


async def _main(port_file, target_port, rtt_ms):
    delay = rtt_ms / 2000.0

    async def relay(client_reader, client_writer):
        try:
            hub_reader, hub_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, hub_writer, delay),
            _pump(hub_reader, client_writer, delay),
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as f:
        f.write("{}\n".format(port))
    os.replace(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1])
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
