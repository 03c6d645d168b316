"""Rank 0's queue of the requests the engine (engine.py) has not admitted yet, in arrival order, shared by the
threads that submit and the engine's thread.

A request withdrawn while it waits (its client went away) leaves the queue at once, so it holds no slot: the
queue's length is the requests somebody still waits for. The engine bounds it (max_queue)."""
import collections
import threading


class QueueFull(RuntimeError):
    """The engine's queue holds max_queue requests already."""


class Waiting:
    """Jobs in arrival order."""

    def __init__(self):
        self.items, self.cond = collections.deque(), threading.Condition()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, job):
        with self.cond:
            self.items.append(job)
            self.cond.notify_all()

    def peek(self):
        """The oldest job, or None."""
        with self.cond:
            return self.items[0] if self.items else None

    def remove(self, job) -> bool:
        """Take `job` out (False: it is not waiting any more)."""
        with self.cond:
            try:
                self.items.remove(job)
            except ValueError:
                return False
            return True

    def take(self, match):
        """Take out and return the oldest job for which match(job) holds (None: no such job is waiting)."""
        with self.cond:
            job = next((j for j in self.items if match(j)), None)
            if job is not None:
                self.items.remove(job)
            return job

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a request; whether one is waiting."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            return bool(self.items)
