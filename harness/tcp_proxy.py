"""A TCP forwarder to PostgreSQL that tests put between a service and the database, to make the
database slow, silent or gone."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, port: int, database_url: str) -> None:
        self.port = port
        parts = urlsplit(database_url)
        self.target_port = parts.port or 5432
        # database_url with the proxy in place of the server.
        self.url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        # Set: bytes are swallowed, nothing answers (a database host that went silent).
        self.frozen = False
        # Each chunk waits this long before it is passed on, both ways (a distant or slow database).
        self.delay_seconds = 0.0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.frozen:
                        continue
                    if self.delay_seconds:
                        await asyncio.sleep(self.delay_seconds)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            self.writers.clear()
            await self.server.wait_closed()
            self.server = None
