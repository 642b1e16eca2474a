"""The framed socket channel between client, master and workers (pilotfish.wire.messages.Channel):
frames coalesced in one read, non-blocking writes with a backlog, large frames, EOF."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from pilotfish.wire.messages import Channel


@pytest.fixture
def pair() -> Iterator[Callable[[], tuple[Channel, Channel]]]:
    made: list[Channel] = []

    def make() -> tuple[Channel, Channel]:
        a, b = socket.socketpair()
        made.extend([Channel(a), Channel(b)])
        return made[-2], made[-1]

    yield make
    for ch in made:
        ch.close()


def test_frames_written_apart_are_read_together_in_order(
    pair: Callable[[], tuple[Channel, Channel]],
) -> None:
    a, b = pair()
    for i in range(100):
        a.send([i, str(i)])
    got: list[object] = []
    while len(got) < 200:
        got += b.recv()
    assert got == [x for i in range(100) for x in (i, str(i))]
    assert b.recv_nowait() == []
    assert not b.poll()


def test_queue_never_blocks_and_flush_delivers_everything(
    pair: Callable[[], tuple[Channel, Channel]],
) -> None:
    """The master's way to write to a busy worker: a frame larger than the socket buffer
    is queued at once; it arrives whole once the reader reads and the writer flushes."""
    a, b = pair()
    big = b"x" * (8 << 20)
    assert a.queue([big, 1]) is False  # the socket could not take 8 MB at once
    assert a.backlog > 0
    a.queue(["after"])  # queued behind, in order
    got: list[object] = []

    def read() -> None:
        while len(got) < 3:
            got.extend(b.recv())

    reader = threading.Thread(target=read)
    reader.start()
    while a.backlog:
        a.flush()
    reader.join(10)
    assert got[0] == big and got[1:] == [1, "after"]


def test_a_partial_frame_is_completed_by_later_reads(
    pair: Callable[[], tuple[Channel, Channel]],
) -> None:
    a, b = pair()
    frame = Channel.frame(["hello", 42])
    a.sock.sendall(frame[:5])
    assert b.recv_nowait() == []  # half a header: nothing yet, and no blocking
    a.sock.sendall(frame[5:-3])
    assert b.recv_nowait() == []
    a.sock.sendall(frame[-3:])
    assert b.poll()
    assert b.recv() == ["hello", 42]


def test_eof_is_reported_even_mid_frame(pair: Callable[[], tuple[Channel, Channel]]) -> None:
    a, b = pair()
    a.sock.sendall(Channel.frame(["cut"])[:7])
    a.close()
    with pytest.raises(EOFError):
        b.recv()
    a2, b2 = pair()
    a2.close()
    with pytest.raises(EOFError):
        b2.recv_nowait()
