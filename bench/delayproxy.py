"""A TCP forwarder that holds every chunk for a fixed delay, each way.

The lab's kernel has no `netem`, so the round trip between the app hosts and
the db host is made here: `--delay-ms 1` adds 1 ms one way, 2 ms to a round
trip. Order within a connection is kept: chunks leave in the order they came.

    python -m bench.delayproxy --listen 10.231.0.1:6432 --target 127.0.0.1:5432 --delay-ms 1
"""

import argparse
import asyncio
import contextlib
import socket

CHUNK = 65536


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk leaving `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        while data := await reader.read(CHUNK):
            held.put_nowait((loop.time() + delay, data))
        held.put_nowait((0.0, b""))

    taker = asyncio.create_task(take())
    try:
        while True:
            due, data = await held.get()
            if not data:
                writer.write_eof()
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    finally:
        taker.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await taker


async def forward(target: tuple[str, int], delay: float,
                  client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    no_delay(client_writer)
    no_delay(server_writer)
    with contextlib.suppress(ConnectionError, OSError):
        await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))
    for writer in (client_writer, server_writer):
        writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: forward(target, delay, r, w), *listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--target", type=address, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
