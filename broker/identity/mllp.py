"""The MLLP listener for the HL7 v2 identity feed (IHE ITI-8), on the `hl7` library's streams.

It runs an asyncio server in a thread of its own, so `scanonce serve` (beside uvicorn), the
`scanonce identity mllp` command and tests all start and stop it the same way:
`start_mllp` returns a handle once the socket is bound, `stop_mllp` closes it, ends the
connections and joins the threads.

Each connection reads MLLP blocks one by one; every message is applied in a worker thread
(the database blocks) and answered before the next is read, so a sender's order is kept while
other connections go on. The answer is what the message asks for (`adt.handle_message`): one
ACK in original mode; in enhanced mode an accept and an application acknowledgement, one
frame each, either or none. A block that does not start with <VT> is answered with an AR and
reading goes on at the next block; a block over MAX_MESSAGE_BYTES is answered with an AR and
the connection closed (where the next block starts is unknown). Those, and a failure on our
side, are answered in the mode the block's MSH-15/16 ask for when its MSH segment can be read
(`adt.refuse`), else in original mode. A sender that goes away mid-block costs its own
connection only. Logs carry peers and control ids, never message content.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hl7.mllp import InvalidBlockError, start_hl7_server
from hl7.mllp.streams import HL7StreamReader, HL7StreamWriter
from sqlalchemy.engine import Engine

from broker.identity.adt import (
    DEFAULT_PROCESSING_IDS,
    INTERNAL,
    SEGMENT_SEQUENCE,
    Ack,
    Reply,
    declared_codec,
    decode_text,
    handle_message,
    nak,
    original,
    refuse,
)
from broker.metrics import observe_mllp
from broker.security.schemas import Principal

log = logging.getLogger("scanonce.identity.mllp")

# An ADT message is a few kilobytes; this bounds what one sender can make us buffer.
MAX_MESSAGE_BYTES = 1024 * 1024
# How long a refused oversized message's remainder is read and dropped before closing.
LINGER_SECONDS = 5.0
# Messages applied at once across all connections (each holds a database connection).
WORKERS = 8
# What is read of a refused oversized block to find its MSH segment (`_Oversized`).
_HEAD_BYTES = 4096

# The connections each listening server is serving (asyncio.Server does not track them).
_connections: weakref.WeakKeyDictionary[asyncio.Server, set[asyncio.Task[None]]] = weakref.WeakKeyDictionary()


def _declared(block: bytes) -> str:
    """The codec the block's MSH-18 names ("" when none or unknown)."""
    return declared_codec(block.split(b"\r", 1)[0].decode("latin-1"))


def _decode(block: bytes) -> str:
    """In the character set MSH-18 declares, or UTF-8, or Latin-1 (`adt.decode_text`)."""
    return decode_text(block, _declared(block))


_START_BLOCK, _END_BLOCK = b"\x0b", b"\x1c\r"
# What senders put between blocks: a CR/LF after <FS><CR>, or padding. Not part of any block.
_BETWEEN_BLOCKS = frozenset(b" \t\r\n")


def _after_start(content: bytes) -> bytes:
    """A refused block's message: what follows its <VT> if it has one further on (stray bytes
    before it), else all of it (a sender that never writes one)."""
    start = content.find(_START_BLOCK)
    return content[start + 1 :] if start >= 0 else content


class _Unframed(InvalidBlockError):
    """A block that does not start with <VT>, consumed up to its <FS><CR>; `message` what it
    holds after any <VT> (its MSH segment says how to answer it)."""

    def __init__(self, message: bytes) -> None:
        super().__init__("Block does not begin with Start Block character <VT>")
        self.message = message


class _Oversized(ValueError):
    """A block over the stream's limit; `head` its first bytes (after any <VT>), to read its
    MSH segment from. The rest is still unread."""

    def __init__(self, head: bytes) -> None:
        super().__init__(f"block larger than {MAX_MESSAGE_BYTES} bytes")
        self.head = head


async def _read_block(reader: HL7StreamReader) -> bytes:
    """The next MLLP block's content, as `HL7StreamReader.readblock` reads it, but skipping
    whitespace before the <VT>: the library took a trailing <LF> for the start of a block
    without <VT>, and the message after it was answered AR and lost.

    Raises _Unframed (anything else before <VT>: the block is consumed), _Oversized (over the
    stream's limit), asyncio.IncompleteReadError (the peer went away)."""
    while (first := await reader.readexactly(1))[0] in _BETWEEN_BLOCKS:
        pass
    try:
        rest = await reader.readuntil(_END_BLOCK)
    except asyncio.LimitOverrunError:
        # The bytes are left in the reader's buffer: its first ones come at once.
        head = first + await reader.read(_HEAD_BYTES)
        raise _Oversized(head[1:] if first == _START_BLOCK else _after_start(head)) from None
    if first != _START_BLOCK:
        raise _Unframed(_after_start(first + rest[: -len(_END_BLOCK)]))
    return rest[: -len(_END_BLOCK)]


async def _reply(writer: HL7StreamWriter, *acks: Ack, codec: str = "") -> None:
    """Each ACK in a block of its own, in the character set the message declared in MSH-18
    (the ACK's MSH-18 says so too: `adt._build_ack`), UTF-8 when it declared none: a receiver
    reads the answer as it wrote the question. What that set cannot hold (an echoed name)
    becomes "?". No ACK (enhanced mode asking for none): nothing is written."""
    for ack in acks:
        writer.writeblock(ack.message.encode(codec or "utf-8", errors="replace"))
    await writer.drain()


def _refused(message: bytes, code: str, text: str, error: str, *, accept: str) -> Reply:
    """`adt.refuse` for the bytes of a block that was not handled as a message."""
    try:
        return refuse(_decode(message), code, text, error, accept=accept)
    except Exception:  # noqa: BLE001 - whatever broke reading its header, the sender gets an answer
        return original(nak(code, text, error))


async def _serve_connection(
    engine: Engine,
    principal: Principal,
    processing_ids: Collection[str],
    reader: HL7StreamReader,
    writer: HL7StreamWriter,
) -> None:
    peer = writer.get_extra_info("peername")
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                block = await _read_block(reader)
            except _Unframed as exc:
                # The bytes up to the end-of-block were consumed: the next block can still be read.
                # Framed as it should be, the same message may be taken: CE, not CR.
                no_vt = "MLLP block does not start with <VT> (0x0B)"
                reply = _refused(exc.message, "AR", no_vt, SEGMENT_SEQUENCE, accept="CE")
                await _reply(writer, *reply.acks, codec=_declared(exc.message))
                continue
            except _Oversized as exc:
                too_big = f"message larger than {MAX_MESSAGE_BYTES} bytes"
                reply = _refused(exc.head, "AR", too_big, INTERNAL, accept="CR")
                await _reply(writer, *reply.acks, codec=_declared(exc.head))
                await _linger(reader, writer)
                break
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    log.info("MLLP peer %s closed the connection mid-message", peer)
                break
            start = time.perf_counter()
            try:
                reply = await loop.run_in_executor(None, _apply, engine, principal, processing_ids, block)
            except Exception:  # noqa: BLE001 - the sender gets an answer whatever went wrong
                log.error("MLLP message from %s could not be applied", peer)
                failed = "internal error while applying the message"
                reply = _refused(block, "AE", failed, INTERNAL, accept="CE")
            observe_mllp("ADT", reply.code, time.perf_counter() - start)
            await _reply(writer, *reply.acks, codec=_declared(block))
    except (ConnectionError, asyncio.CancelledError):
        pass  # the peer went away, or the listener is stopping
    finally:
        writer.close()


async def _linger(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
    """Say we are done but read (and drop) what the sender still sends for a moment: closing
    with unread input resets the connection, and the sender would lose the AR before it."""
    if writer.can_write_eof():
        writer.write_eof()
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError):
        pass


def _apply(engine: Engine, principal: Principal, processing_ids: Collection[str], block: bytes) -> Reply:
    return handle_message(
        engine=engine, raw=_decode(block), principal=principal, processing_ids=processing_ids
    )


async def start_mllp_listener(
    *,
    engine: Engine,
    principal: Principal,
    host: str = "127.0.0.1",
    port: int = 2575,
    processing_ids: Collection[str] = DEFAULT_PROCESSING_IDS,
) -> asyncio.Server:
    """Start listening on the running loop (port 0 picks a free one: see
    `server.sockets[0].getsockname()`). Prefer `start_mllp`, which also owns the threads.
    Messages are applied as `principal` (`adt.feed_principal`); only those whose MSH-11 is one
    of `processing_ids` (`Settings.mllp_processing_ids`)."""
    tasks: set[asyncio.Task[None]] = set()
    taken = frozenset(p.strip().upper() for p in processing_ids)  # as MSH-11 is compared

    def on_client(reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        serve = _serve_connection(engine, principal, taken, reader, writer)
        task = asyncio.get_running_loop().create_task(serve)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await start_hl7_server(on_client, host=host, port=port, limit=MAX_MESSAGE_BYTES)
    _connections[server] = tasks  # so a stop can end them
    return server


@dataclass
class MllpHandle:
    """A running listener: where it listens, and what `stop_mllp` needs."""

    host: str
    port: int
    loop: asyncio.AbstractEventLoop = field(repr=False)
    thread: threading.Thread = field(repr=False)
    server: asyncio.Server | None = field(default=None, repr=False)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Messages being applied finish (their transactions commit or roll back) before we exit.
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def start_mllp(
    *,
    engine: Engine,
    principal: Principal,
    host: str,
    port: int,
    processing_ids: Collection[str] = DEFAULT_PROCESSING_IDS,
) -> MllpHandle:
    """Listen for HL7 v2 over MLLP in background threads; returns once the socket is bound.
    Messages are applied as `principal` (`adt.feed_principal`), those whose MSH-11 processing ID
    is one of `processing_ids` (HL7 table 0103; `Settings.mllp_processing_ids`): others are refused.

    `port` 0 picks a free port (see `handle.port`). Raises OSError when the address is taken.
    """
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scanonce-mllp"))
    thread = threading.Thread(target=_run_loop, args=(loop,), name="scanonce-mllp-listener", daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(
        start_mllp_listener(
            engine=engine, principal=principal, host=host, port=port, processing_ids=processing_ids
        ),
        loop,
    )
    try:
        server = future.result(timeout=30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        raise
    bound = server.sockets[0].getsockname()
    log.info("MLLP (HL7 v2 ADT, ITI-8) listening on %s:%s", bound[0], bound[1])
    return MllpHandle(host=bound[0], port=bound[1], loop=loop, thread=thread, server=server)


def stop_mllp(handle: MllpHandle, *, timeout: float = 30) -> None:
    """Close the listening socket, end open connections, wait for messages being applied."""
    server, handle.server = handle.server, None
    if server is None:
        return

    async def shutdown() -> None:
        server.close()
        tasks = list(_connections.pop(server, ()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    try:
        asyncio.run_coroutine_threadsafe(shutdown(), handle.loop).result(timeout=timeout)
    finally:
        handle.loop.call_soon_threadsafe(handle.loop.stop)
        handle.thread.join(timeout=timeout)
