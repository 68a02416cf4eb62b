"""L{mailgw.memory.LiveConnections}: the memory trim after a wave of closes, not
under a steady load."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailgw.memory import LiveConnections


class LiveConnectionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.trimmed: list[float] = []
        self.live: LiveConnections[int] = LiveConnections(
            self.clock, batch=64, delay=0.5, min_interval=2.0, trim=lambda: self.trimmed.append(self.clock.seconds())
        )

    def test_waveOfClosesTrimsOnce(self) -> None:
        """2,000 connections that all close: one trim, C{delay} after the batch that
        halved them, and the set is empty."""
        for n in range(2000):
            self.live.add(n)
        for n in range(2000):
            self.live.discard(n)
        self.assertEqual(self.trimmed, [])
        self.clock.advance(0.5)
        self.assertEqual(self.trimmed, [0.5])
        self.clock.advance(10)
        self.assertEqual((self.trimmed, len(self.live), self.live.trims), ([0.5], 0, 1))

    def test_steadyLoadNeverTrims(self) -> None:
        """32 connections held while 100,000 open and close (a busy gateway): no trim
        (a full collection every 2 s would cost more than it gives back)."""
        for n in range(32):
            self.live.add(n)
        for n in range(32, 100_032):
            self.live.add(n)
            self.live.discard(n - 32)
            self.clock.advance(0.001)
        self.clock.advance(10)
        self.assertEqual(self.trimmed, [])
        self.assertEqual(len(self.live), 32)

    def test_fluctuationNeverTrims(self) -> None:
        """A worker's share of a load swinging between 4 and 30 sessions (halved
        again and again, but never by a batch): no trim."""
        held = 0
        for _round in range(2000):
            for _ in range(30 - held):
                self.live.add(held)
                held += 1
            while held > 4:
                held -= 1
                self.live.discard(held)
            self.clock.advance(0.01)
        self.clock.advance(10)
        self.assertEqual(self.trimmed, [])

    def test_loadEndsThenTrims(self) -> None:
        """After a load of 200 sessions at a time, their closing brings the trim."""
        for n in range(200):
            self.live.add(n)
        for n in range(200, 1200):
            self.live.add(n)
            self.live.discard(n - 200)
        self.assertEqual(self.trimmed, [])
        for n in range(1000, 1200):
            self.live.discard(n)
        self.clock.advance(0.5)
        self.assertEqual(len(self.trimmed), 1)

    def test_atMostEveryMinInterval(self) -> None:
        """Two waves 1 s apart: the second trim waits until C{min_interval} after the first."""

        def wave() -> None:
            for n in range(100):
                self.live.add(n)
            for n in range(100):
                self.live.discard(n)

        wave()
        self.clock.advance(0.5)
        self.assertEqual(self.trimmed, [0.5])
        self.clock.advance(0.5)
        wave()
        self.clock.advance(1.0)
        self.assertEqual(self.trimmed, [0.5])
        self.clock.advance(0.5)
        self.assertEqual(self.trimmed, [0.5, 2.5])

    def test_stopCancels(self) -> None:
        for n in range(100):
            self.live.add(n)
        for n in range(100):
            self.live.discard(n)
        self.live.stop()
        self.clock.advance(10)
        self.assertEqual(self.trimmed, [])
