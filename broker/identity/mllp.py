"""An asyncio MLLP listener for the HL7 v2 identity feed (IHE ITI-8).

Each connection reads MLLP blocks one by one; every message is applied in a worker thread
(the database blocks) and answered with its ACK before the next is read, so a sender's
order is kept. A broken MLLP frame closes the connection (nothing can be acknowledged).
"""

from __future__ import annotations

import asyncio
import logging

from hl7.mllp import InvalidBlockError, start_hl7_server
from hl7.mllp.streams import HL7StreamReader, HL7StreamWriter
from sqlalchemy.engine import Engine

from broker.identity.adt import handle_message

log = logging.getLogger("scanonce.identity.mllp")


def _decode(block: bytes) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")  # HL7 v2's traditional 8-bit default


async def start_mllp_listener(*, engine: Engine, host: str = "127.0.0.1", port: int = 2575) -> asyncio.Server:
    """Start listening (port 0 picks a free one: see `server.sockets[0].getsockname()`)."""

    async def on_client(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                try:
                    block = await reader.readblock()
                except (InvalidBlockError, asyncio.IncompleteReadError, ValueError):
                    break
                ack = await asyncio.to_thread(handle_message, engine=engine, raw=_decode(block))
                writer.writeblock(ack.message.encode("utf-8"))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await start_hl7_server(on_client, host=host, port=port, encoding="utf-8")


def serve_forever(*, engine: Engine, host: str, port: int) -> None:
    """Blocking entry point for a CLI command."""

    async def main() -> None:
        server = await start_mllp_listener(engine=engine, host=host, port=port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
