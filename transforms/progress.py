"""Progress from the workers to the driver while a job runs: counters that also tick.

Why: a command should say every few seconds how far it is, but Beam's metrics are not
readable while a job runs on the runners used most here: the DirectRunner's ``run()``
returns only when the job is done (in every mode: in-memory, multi-threading,
multi-processing), and this project's Dask runner (``runners/dask_runner.py``) gets a
bundle's counters with the bundle's result. So the counters that progress is made of
also send their counts to the driver, which prints the line
(:mod:`pipelines.progress`).

How: while the driver has a channel open (:func:`open_channel`, a UDP address its
receiver listens on), :func:`counter` returns a :class:`ProgressCounter`: the Beam
counter of that name plus a tick. Ticks add to one table per worker process; a daemon
thread of that process wakes every ``SEND_EVERY_S`` and, if the table changed, sends
it (cumulative counts, tagged with the channel's token and the process's own id) in one
datagram. Cumulative counts make a lost or reordered datagram harmless: the next one
carries everything. The cost per tick is a lock and a dict update (the Beam counter
itself costs more), and a few datagrams a second per process. Outside a channel,
:func:`counter` returns Beam's counter itself: no tick, no thread, no socket.

A DoFn must create its counters in ``__init__`` (on the driver, while the pipeline is
built) so that they carry the channel's address to wherever the DoFn is unpickled.
The final counts of a job are always Beam's own metrics; ticks only feed the progress
line, and a re-run bundle may tick twice.
"""
import atexit
import json
import os
import socket
import threading
import time
import uuid
from typing import Dict, Optional, Tuple

from apache_beam.metrics import Metrics

__all__ = ["ProgressCounter", "close_channel", "counter", "open_channel"]

SEND_EVERY_S = 0.5

# (host, port, token) of the driver's receiver while one is open, else None.
_CHANNEL: Optional[Tuple[str, int, str]] = None


def open_channel(host: str, port: int) -> Tuple[str, int, str]:
    """Counters created from now on tick to ``host:port``; -> the channel (with a fresh
    token, so that ticks of an earlier channel's DoFns are told apart)."""
    global _CHANNEL
    _CHANNEL = (str(host), int(port), uuid.uuid4().hex[:12])
    return _CHANNEL


def close_channel() -> None:
    """Counters created from now on are plain Beam counters."""
    global _CHANNEL
    _CHANNEL = None


def counter(namespace: str, name: str):
    """Beam's ``Metrics.counter(namespace, name)``, ticking to the driver's open channel
    if there is one (see the module docstring)."""
    beam_counter = Metrics.counter(namespace, name)
    if _CHANNEL is None:
        return beam_counter
    return ProgressCounter(beam_counter, name, _CHANNEL)


class ProgressCounter:
    """A Beam counter whose increments are also sent to the driver's progress receiver."""

    def __init__(self, beam_counter, name: str, channel: Tuple[str, int, str]):
        self._counter = beam_counter
        self._name = name
        self._channel = channel
        self._sender = None

    def __getstate__(self):
        return {"counter": self._counter, "name": self._name, "channel": self._channel}

    def __setstate__(self, state):
        self._counter, self._name = state["counter"], state["name"]
        self._channel, self._sender = tuple(state["channel"]), None

    def inc(self, n: int = 1) -> None:
        self._counter.inc(n)
        sender = self._sender
        if sender is None:
            sender = self._sender = _sender_for(self._channel)
        sender.add(self._name, n)

    def dec(self, n: int = 1) -> None:
        self.inc(-n)


class _Sender:
    """One worker process's cumulative counts for one channel, sent by a daemon thread."""

    def __init__(self, channel: Tuple[str, int, str]):
        self.address = (channel[0], channel[1])
        self.token = channel[2]
        self.id = "%d-%s" % (os.getpid(), uuid.uuid4().hex[:8])
        self.counts: Dict[str, int] = {}
        self.lock = threading.Lock()
        self.version = 0
        self.sent = 0
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        threading.Thread(target=self._loop, name="cctview-progress", daemon=True).start()
        # a worker process that ends (the multi-process DirectRunner starts one per stage)
        # sends what its last SEND_EVERY_S counted
        atexit.register(self.flush)

    def add(self, name: str, n: int) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + int(n)
            self.version += 1

    def _loop(self) -> None:
        while True:
            time.sleep(SEND_EVERY_S)  # one datagram per SEND_EVERY_S at most, if changed
            self.flush()

    def flush(self) -> None:
        """Sends the counts if they changed since the last datagram."""
        if self.version != self.sent:
            self.send()

    def send(self) -> None:
        with self.lock:
            self.sent = self.version
            payload = json.dumps({"t": self.token, "s": self.id, "c": self.counts})
        try:
            self.socket.sendto(payload.encode("utf-8"), self.address)
        except OSError:  # the driver is gone or unreachable: progress is best effort
            pass


_SENDERS: Dict[Tuple[str, int, str], _Sender] = {}
_SENDERS_LOCK = threading.Lock()


def _sender_for(channel: Tuple[str, int, str]) -> _Sender:
    with _SENDERS_LOCK:
        sender = _SENDERS.get(channel)
        if sender is None or sender.id.split("-", 1)[0] != str(os.getpid()):
            sender = _SENDERS[channel] = _Sender(channel)
        return sender
