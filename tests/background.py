"""Subprocesses that start with the test session, for tests that read their results later.

The test process runs one test at a time on one core (conftest.py gives torch one thread). A
subprocess whose result a test only reads (the kernel report's fresh compiles, the DDP/FSDP
workers, the torchrun example) can run meanwhile on the cores the tests leave idle, instead of
making the test process wait for it. A test module declares such a :class:`Job`, named by the
fixture through which its tests read it; before the first test, conftest.py starts every job that
a selected test reaches through that fixture (a job that no selected test needs never starts).

Jobs run at a lower priority (``nice`` +10): they take the CPU the tests leave idle and barely
slow them; while a test waits for a job, the job has the machine. A job's timeout counts from the
moment a test starts waiting for it, since until then it may share the machine with the tests.

Like helpers.py, this module imports nothing heavy at module level.
"""

import os
import shutil
import signal
import subprocess
from pathlib import Path

NICE = 10
JOBS: dict[str, "Job"] = {}
"""Every declared job, by the name of the fixture through which tests read it."""


def _skipped(item) -> bool:
    """Marked ``skip``, or ``skipif`` with a condition that is True (a string condition counts as
    not skipped: the job then starts for nothing, which costs time, not correctness)."""
    return item.get_closest_marker("skip") is not None or any(
        marker.args and marker.args[0] is True for marker in item.iter_markers("skipif"))


def selected_users(items, fixture: str) -> list:
    """The selected, not skipped, tests that reach ``fixture``."""
    return [item for item in items if fixture in getattr(item, "fixturenames", ()) and not _skipped(item)]


class Job:
    """One subprocess, ``command(folder, items)`` (the selected tests that need it), run in ``cwd``
    (None: the test process' directory; "folder": the job's own folder) with ``env()``; its
    output goes to ``stdout`` and ``stderr`` in its folder (files: a job never blocks on a pipe)."""

    def __init__(self, fixture: str, command, timeout: float, env=None, cwd=None) -> None:
        assert fixture not in JOBS, f"two background jobs behind the fixture {fixture!r}"
        self.fixture, self.command, self.timeout, self.env, self.cwd = fixture, command, timeout, env, cwd
        self.folder: Path | None = None
        self.proc: subprocess.Popen | None = None
        JOBS[fixture] = self

    def start(self, folder: Path, items=()) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        nice = [shutil.which("nice"), "-n", str(NICE)] if shutil.which("nice") else []
        with open(self.folder / "stdout", "w") as out, open(self.folder / "stderr", "w") as err:
            self.proc = subprocess.Popen(
                nice + self.command(self.folder, items), env=self.env() if self.env else None,
                cwd=self.folder if self.cwd == "folder" else self.cwd, stdout=out, stderr=err,
                start_new_session=True,  # its own process group: stop() ends its children too
            )

    def wait(self) -> subprocess.CompletedProcess:
        """The finished process, its output read back; returncode None if it ran past the timeout
        (then ended)."""
        assert self.proc is not None, f"the job behind {self.fixture!r} was never started (conftest.py starts it)"
        try:
            self.proc.wait(timeout=self.timeout)
            code = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        return subprocess.CompletedProcess(
            self.proc.args, code, (self.folder / "stdout").read_text(), (self.folder / "stderr").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_needed(items, tmp_path_factory) -> list[Job]:
    """Start every job that a selected test needs; returns them (for :meth:`Job.stop` at the end)."""
    started = []
    for fixture, job in JOBS.items():
        users = selected_users(items, fixture)
        if users:
            job.start(tmp_path_factory.mktemp(fixture), users)
            started.append(job)
    return started
