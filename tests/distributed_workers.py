"""The 2-process gloo runs behind tests/test_ddp.py and tests/test_fsdp.py: one pair of processes per backend.

Each backend has its own pair of worker processes, port, logs and results, so a failure of one
backend's workers (an exception, a hang, a segfault) fails that backend's tests and no other: the
torch results still report when the interpreted Triton run crashes. Each pair runs every scenario
of its backend, DDP's and then FSDP's, in one process group.

Start-up is shared. Importing torch, torch.distributed, transformers and pefttriton takes about
4 s of CPU per process, more than most scenarios, so one launcher process imports them once and
forks the four workers (fork before any thread or process group exists: each child is a process of
its own, with the modules already loaded). Both pairs start together, in the background, with the
test session (tests/background.py: :data:`RUNS` is the job behind the session fixture
``distributed_runs``), and the tests before them run meanwhile.

The launcher is this file run as a script::

    python distributed_workers.py OUT_DIR BACKENDS MODULE [MODULE ...]      # BACKENDS: torch,triton

Worker ``rank`` of ``backend`` runs, for each test module named (``test_ddp``, ``test_fsdp``), in
order, the module's ``worker(backend, rank, out_dir)`` and saves what it returns to
``OUT_DIR/<backend>/<module>_rank<rank>.pt`` (written under another name, then renamed: a file
that exists is complete), its output to ``rank<rank>.log`` there. The launcher writes each worker's
exit code to ``rank<rank>.exit`` and, when a worker fails, ends its partner at once (it would wait
in a collective until gloo's timeout). The workers talk over 127.0.0.1 only (a free port per pair,
``GLOO_SOCKET_IFNAME=lo``); the test process ends a pair that a test has waited for longer than
:data:`TIMEOUT_S`.

Like helpers.py, this module imports nothing heavy at module level.
"""

import datetime
import importlib
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from background import Job

WORLD = 2
TIMEOUT_S = 150
"""Hard limit for one backend's pair, from the moment a test first waits for it to its last result."""
HERE = Path(__file__).resolve().parent
PRELOAD = (
    "torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint",
    "torch.distributed.device_mesh", "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
    "torch.nn.parallel", "transformers.models.llama.modeling_llama", "pefttriton",
    "pefttriton.integration.injection", "pefttriton.integration.distributed",
)
"""What the launcher imports before forking (a module left out is imported by each worker: slower,
not wrong)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """The workers import helpers and the test modules (tests/) and, like pytest, find the
    repository root first on the path (this checkout's pefttriton)."""
    pythonpath = os.pathsep.join([str(HERE), str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {
        **os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
        "PYTHONPATH": pythonpath,
    }


# ------------------------------------------------------------------------------ the test process' side


def _needed(items) -> tuple[list[str], list[str]]:
    """(backends, test modules) that the selected tests reaching ``distributed_runs`` ask for: a
    test's ``backend`` parameter, else "torch"; modules in collection order."""
    backends, modules = set(), []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backends.add(callspec.params.get("backend", "torch") if callspec else "torch")
        if item.path.stem not in modules:
            modules.append(item.path.stem)
    return sorted(backends), modules


class Runs(Job):
    """The worker pairs of one test session: a background job (tests/background.py) behind the
    session fixture ``distributed_runs``, so they run while the tests before them do."""

    def __init__(self) -> None:
        super().__init__("distributed_runs", self._command, TIMEOUT_S, env=worker_env)
        self.backends: list[str] = []
        self.failures: dict[str, str] = {}
        self.deadline = None
        self.waited: dict[tuple, float] = {}  # (backend, module) -> seconds a test waited for them

    def _command(self, folder: Path, items) -> list[str]:
        self.backends, modules = _needed(items)
        for backend in self.backends:
            (folder / backend).mkdir(parents=True, exist_ok=True)
        return [sys.executable, __file__, str(folder), ",".join(self.backends), *modules]

    def folder_of(self, backend: str) -> Path:
        """Where ``backend``'s workers write (their checkpoints, results and logs)."""
        return self.folder / backend

    def _exit_codes(self, backend: str) -> list:
        files = [self.folder_of(backend) / f"rank{rank}.exit" for rank in range(WORLD)]
        return [int(f.read_text()) if f.exists() else None for f in files]

    def _kill(self, backend: str) -> None:
        for rank in range(WORLD):
            pid_file = self.folder_of(backend) / f"rank{rank}.pid"
            if pid_file.exists() and not (self.folder_of(backend) / f"rank{rank}.exit").exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _logs(self, backend: str) -> str:
        parts = [f"--- launcher:\n{(self.folder / 'stderr').read_text()[-2000:]}"]
        for rank, code in enumerate(self._exit_codes(backend)):
            log = self.folder_of(backend) / f"rank{rank}.log"
            parts.append(f"--- rank {rank}, exit {code}:\n{log.read_text()[-3000:] if log.exists() else ''}")
        return "\n".join(parts)

    def _wait(self, backend: str, module: str) -> str | None:
        """Wait for both ranks' results of ``module``; what went wrong, or None."""
        if backend not in self.backends:
            return f"no {backend} workers: this session selected none of their tests"
        files = [self.folder_of(backend) / f"{module}_rank{rank}.pt" for rank in range(WORLD)]
        if self.deadline is None:  # the workers may have shared the machine with the tests until now
            self.deadline = time.perf_counter() + TIMEOUT_S
        while backend not in self.failures and not all(f.exists() for f in files):
            codes = self._exit_codes(backend)
            why = None
            if any(code not in (None, 0) for code in codes):  # a segfault shows as -11
                why = f"exited with {codes} before the results of {module}"
            elif all(code == 0 for code in codes) or self.proc.poll() is not None:
                if not all(f.exists() for f in files):  # (a result may land between the two looks)
                    why = f"ended without the results of {module} (exit codes {codes})"
            elif time.perf_counter() > self.deadline:
                self._kill(backend)
                why = f"did not finish {module} within {TIMEOUT_S} s"
            if why is not None:
                self.failures[backend] = f"{backend} workers {why}\n{self._logs(backend)}"
            else:
                time.sleep(0.05)
        return self.failures.get(backend)

    def results(self, backend: str, module: str) -> list[dict]:
        """Both ranks' results of ``module`` under ``backend``; fails the calling test (only that
        backend's tests) when its workers failed."""
        import pytest
        import torch

        assert self.proc is not None, "the distributed runs were never started (conftest.py starts them)"
        start = time.perf_counter()
        failure = self._wait(backend, module)
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        self.waited.setdefault((backend, module), time.perf_counter() - start)
        return [torch.load(self.folder_of(backend) / f"{module}_rank{rank}.pt", weights_only=False)
                for rank in range(WORLD)]


if __name__ != "__main__":  # (the launcher imports this module again through the test modules)
    RUNS = Runs()


# ------------------------------------------------------------------------------ the launcher and workers


def _worker(backend: str, rank: int, port: int, out: Path, modules: list[str]) -> None:
    import torch
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    for name in modules:
        results = importlib.import_module(name).worker(backend, rank, out)
        partial = out / f".{name}_rank{rank}.pt"
        torch.save(results, partial)
        partial.replace(out / f"{name}_rank{rank}.pt")
    dist.destroy_process_group()


def _fork_worker(backend: str, rank: int, port: int, out: Path, modules: list[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        (out / f"rank{rank}.pid").write_text(str(pid))
        return pid
    code = 1
    try:  # the child: its output to its own log, its exit code from its run alone
        log = os.open(out / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        _worker(backend, rank, port, out, modules)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _launcher(out: Path, backends: list[str], modules: list[str]) -> None:
    # The interpreter must be on before pefttriton is imported, as under pytest (conftest.py).
    os.environ["TRITON_INTERPRET"] = "1"
    for name in (*PRELOAD, *modules):
        importlib.import_module(name)
    workers = {}
    for backend in backends:
        port = free_port()
        for rank in range(WORLD):
            workers[_fork_worker(backend, rank, port, out / backend, modules)] = (backend, rank)
    partners = {key: pid for pid, key in workers.items()}
    while workers:
        pid, status = os.wait()
        backend, rank = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        (out / backend / f"rank{rank}.exit").write_text(str(code))
        partner = partners[(backend, 1 - rank)]
        if code != 0 and partner in workers:
            os.kill(partner, signal.SIGKILL)  # blocked in a collective with the failed rank


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit("usage: python distributed_workers.py OUT_DIR BACKENDS MODULE [MODULE ...]")
    _launcher(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:])
