"""How the tests run crate-lit's commands: each run is a process of its own, started the quick way.

A fresh interpreter spends about 14 s of this project's 2-core CI machine importing torch,
Lightning, timm and Hydra before a command reads its first argument, and the suite runs a
hundred commands. So each test process keeps one *zygote*: a process that imported crate-lit
once and then forks a child per command. The child is a real process with its own working
directory, environment, argv (``sys.argv[0]`` is the installed console script, so Lightning's
DDP launcher and Hydra relaunch it as they would), stdout, stderr, exit code and signals; it runs
the console script's own entry point. What it cannot have is what an interpreter reads only at
start-up, so a command whose environment sets a ``PYTHON*`` variable other than ``PYTHONPATH``
(whose folders the child puts on ``sys.path``), or a ``PYTHONPATH`` with a ``sitecustomize``, gets
a fresh interpreter, as does every command when ``CRATE_LIT_TEST_FRESH=1``
(the switch that checks this shortcut changes no result). The commands' start-up itself is tested
in fresh interpreters: tests/test_cli.py's built wheel and ``--cfg job`` tests.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a few optimizer steps on a tiny model and split: seconds, not minutes
QUICK = [
    "model=crate_micro",
    "data.image_size=32",  # the demo's 48 px is 2.2 times the tokens; the tests need no more
    "data.train_size=64",
    "data.val_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
FRESH = os.environ.get("CRATE_LIT_TEST_FRESH") == "1"

# runs in the zygote: import once, then fork a child per request read from stdin; replies (the
# child's pid, then its exit status) go out on a descriptor of their own, since the children's
# stdout and stderr are files
_ZYGOTE = r"""
import atexit, importlib.metadata, json, os, sys, threading
import crate_lit.analyze, crate_lit.bench, crate_lit.pack, crate_lit.train
replies = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
scripts = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts")}
replies.write(json.dumps({"ready": threading.active_count()}) + "\n")
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        replies.close()
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = request["argv"]
        # the script's folder first, then PYTHONPATH's: the path a fresh interpreter starts with
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(sys.argv[0]), *extra, *(p for p in sys.path[1:] if p not in extra)]
        code = 0
        try:
            scripts[os.path.basename(sys.argv[0])].load()()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # the end of an interpreter, in its order: threading's exit hooks (concurrent.futures stops
        # its pools there, e.g. inductor's compile workers) and the joins of the threads that are
        # not daemons, the atexit handlers (wandb finishes its run there), a flush. Not the rest
        # of a normal exit: tearing down the modules a forked child shares with the zygote writes
        # to every page of them, and copying those took 2.5 s of each command on the 2-core
        # machine (0.1 s this way). threading._shutdown is private: the interpreter's own step
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    replies.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class _Zygote:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.ready = False

    def _reply(self, timeout: float | None) -> dict:
        stream = self.process.stdout
        if not select.select([stream], [], [], timeout)[0]:
            raise TimeoutError
        line = stream.readline()
        if not line:
            raise RuntimeError("the test zygote exited")
        return json.loads(line)

    def run(
        self, argv: list[str], cwd: Path, env: Mapping[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        if not self.ready:
            threads = self._reply(timeout=600)["ready"]
            # a fork copies one thread: a zygote with others could fork with a lock held
            assert threads == 1, f"the test zygote has {threads} threads; forking it is not safe"
            self.ready = True
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {
                "argv": argv,
                "cwd": str(cwd),
                "env": dict(env),
                "stdout": str(out),
                "stderr": str(err),
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            pid = self._reply(timeout=60)["pid"]
            try:
                code = self._reply(timeout)["returncode"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(
                argv, code, out.read_text(errors="replace"), err.read_text(errors="replace")
            )

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


_zygote: _Zygote | None = None


def start_zygote() -> None:
    """Start the zygote importing, in the background, until the first command needs it."""
    global _zygote
    if _zygote is None and not FRESH:
        _zygote = _Zygote()
        atexit.register(_zygote.close)


def _needs_fresh_interpreter(env: Mapping[str, str]) -> bool:
    if any(key.startswith("PYTHON") and key != "PYTHONPATH" for key in env):
        return True
    folders = [Path(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return any(
        (folder / f"{name}.py").exists() for folder in folders for name in ("sitecustomize", "usercustomize")
    )


def run_command(
    command: str, *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``command`` (a crate-lit console script) with ``args`` in ``cwd``, the environment being
    this process's plus ``env``; its output as text, like ``subprocess.run(capture_output=True)``."""
    argv = [str(BIN / command), *args]
    full_env = {**os.environ, **(env or {})}
    if FRESH or _needs_fresh_interpreter(env or {}):
        return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    start_zygote()
    return _zygote.run(argv, cwd, full_env, timeout)


def crate_train(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_command("crate-train", *args, cwd=cwd, env=env)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its timing column."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "whitebox/seconds"} for row in csv.DictReader(handle)]


def one_line_error(proc: subprocess.CompletedProcess, command: str = "crate-train") -> str:
    """The last stderr line of a command that stopped at a user error (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"{command}: error: ")
    return lines[-1]
