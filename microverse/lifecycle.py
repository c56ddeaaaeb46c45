"""The service worker lives only as long as the server that started it.

``bentoml serve`` (what ``microverse serve`` becomes) is a circus arbiter. It creates the listening socket and
starts the worker (where ``MicroVerse`` runs: model, batch worker, job store) with ``setsid``, so the worker
is in a session and process group of its own and inherits the socket (``--fd``). A SIGTERM to the server is
forwarded to the worker, but a SIGKILL of the server, or of its process group, never reaches the worker: it
would run on as an orphan, holding the port, the accelerator and its batch.

:class:`ParentWatchdog` closes that hole from inside the worker: a daemon thread polls ``os.getppid()``; once
the parent is gone it sends this process SIGTERM, so uvicorn's own graceful shutdown runs (the listening
socket closes first, then BentoML's shutdown hook stops the runtime: the running batch goes back to the
queue, the store closes) and the process exits, freeing the port. If the process still runs ``grace``
seconds later (uvicorn waits for in-flight requests, such as a ``/generate`` on a long job), it stops the
runtime itself and ends with ``os._exit``.

Why polling rather than ``prctl(PR_SET_PDEATHSIG)``: that signal is Linux-only, fires when the parent
*thread* that forked the worker exits rather than the process, can only be armed here after the fact (the
same race as reading the parent's pid) and gives no second, certain stage. A poll every 0.5 s costs nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

SERVER_PID_ENV = "MICROVERSE_SERVER_PID"
"""Set by ``microverse serve`` to its own pid before it becomes the BentoML server (the worker's parent)."""
SPAWN_PARENT_PID = int(os.environ.get(SERVER_PID_ENV) or os.getppid())
"""The server's pid: from ``microverse serve`` (so a server killed before this import is noticed too), else the
parent's pid when this module was first imported (:mod:`microverse.service` imports it as the worker starts,
before the model loads)."""


class ParentWatchdog:
    """Shuts this process down, gracefully and then for sure, once its parent process is gone."""

    def __init__(self, on_stop: Callable[[], None], parent_pid: int = SPAWN_PARENT_PID, interval: float = 0.5,
                 grace: float = 60.0) -> None:
        self.on_stop = on_stop
        """Stops the runtime (re-queues the running batch, closes the store); run at most once."""
        self.parent_pid = parent_pid
        """The process whose end ends this one."""
        self.interval = interval
        """Seconds between two looks at the parent."""
        self.grace = grace
        """Seconds the graceful shutdown may take after the parent is gone, before ``os._exit``."""
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="parent-watchdog", daemon=True)

    def start(self) -> ParentWatchdog:
        """Start watching (a daemon thread); returns self."""
        self._thread.start()
        return self

    def shutdown(self, timeout: float = -1) -> None:
        """Run ``on_stop`` unless it ran already (BentoML's shutdown hook and the deadline both call this);
        wait at most ``timeout`` seconds (-1: no limit) for a run in progress elsewhere."""
        if not self._lock.acquire(timeout=timeout):
            logger.error("the runtime did not stop in %.0f s", timeout)
            return
        try:
            if not self._stopped:
                self._stopped = True
                self.on_stop()
        finally:
            self._lock.release()

    def _watch(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(self.interval)
        logger.warning("the server process %d is gone (killed?): shutting this worker down", self.parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: close the socket, then BentoML's shutdown hook
        time.sleep(self.grace)
        logger.error("the worker still runs %.0f s after its server died: stopping the runtime and exiting",
                     self.grace)
        self.shutdown(timeout=self.grace)
        os._exit(1)
