"""The two ends of a ``vllm`` engine worker: :class:`Worker` in the parent, :func:`worker_main` in the child.

The child is a fresh interpreter, ``python -m selfalign.engines.vllm_worker FD``, started in its
own session (so its process group also holds vLLM's engine-core and executor processes). Parent
and child talk over a ``multiprocessing`` pipe whose child end is the inherited descriptor FD.
Everything the child prints, vLLM's logs included, goes to a log file whose tail ends up in the
error when the worker fails.

Messages, parent to child: ``("start", llm_kwargs)`` once, then ``("generate", jobs)`` (one
batch at a time), ``("probs", items)`` (any time, also while a generate batch runs),
``("abort",)`` to drop the generate batch, and ``("close",)``. Child to parent: ``("ready",
info)`` or ``("fatal", reason)`` after start; ``("sample", key, index, text, finish_reason,
completion_tokens)`` per finished sample and ``("done",)`` when the generate batch is finished
or aborted; ``("probs", [(position, probabilities)])`` per probs batch; ``("error", "generate"
| "probs", reason)`` when vLLM refused a batch (the worker dropped it and stays usable); and
``("tick",)``, a sign of life every 5 s while it works.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from pathlib import Path

from selfalign.errors import EngineError

_STOP_WAIT_S = 60.0  # how long stop() waits for a worker to exit before killing its process group


class Worker:
    """One vLLM replica: a ``python -m selfalign.engines.vllm`` child in its own session, and the
    parent's end of the pipe to it. (A fresh interpreter rather than a ``multiprocessing`` spawn,
    so the caller's ``__main__`` is never re-imported and scripts need no ``__main__`` guard.)"""

    def __init__(self, rank: int, llm_args: dict, cuda_devices: str | None) -> None:
        import multiprocessing
        import subprocess
        import sys

        fd, self.log_path = tempfile.mkstemp(prefix=f"selfalign-vllm-{os.getpid()}-{rank}-", suffix=".log")
        self.rank = rank
        self.conn, child = multiprocessing.Pipe()
        env = dict(os.environ)
        if cuda_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_devices
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "selfalign.engines.vllm_worker", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # its own process group, which kill() ends as a whole
            )
        finally:
            os.close(fd)
            child.close()
        self.last_heard = time.monotonic()
        self.failed = False
        self.send(("start", llm_args))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError) as e:
            raise self.failure(f"could not send to it ({type(e).__name__})") from None

    def recv(self) -> tuple:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            try:
                self.proc.wait(5)
            except Exception:  # noqa: BLE001 - failure() kills it
                pass
            raise self.failure("its pipe closed") from None
        self.last_heard = time.monotonic()
        return msg

    def check(self, timeout_s: float, what: str) -> None:
        """Raise if the worker died or has been silent for ``timeout_s``."""
        if not self.alive():
            raise self.failure("it exited")
        if time.monotonic() - self.last_heard > timeout_s:
            raise self.failure(f"it sent nothing for {timeout_s:g}s while {what}")

    def failure(self, why: str) -> EngineError:
        code = self.proc.poll()
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        elif code is not None:
            how = f"exit code {code}"
        else:
            how = "still running; now killed"
        self.kill()
        self.failed = True  # its log stays for the user to read
        return EngineError(f"vLLM worker {self.rank} (pid {self.proc.pid}) failed: {why} ({how}).{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = _STOP_WAIT_S) -> None:
        if self.alive():
            try:
                self.conn.send(("close",))
                self.proc.wait(timeout_s)
            except Exception:  # noqa: BLE001 - killed below
                pass
        self.kill()
        self.conn.close()

    def kill(self) -> None:
        """SIGKILL the worker's process group (vLLM's own engine and executor processes are in it)
        and wait until none of them is alive, so the device memory they held is released."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            pass
        deadline = time.monotonic() + 30
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still alive (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the group exists while any member does
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" Its log is {path}; the last lines:\n" + "\n".join(text) if text else f" Its log {path} is empty."


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()
        if not w.failed:
            try:
                os.unlink(w.log_path)
            except OSError:
                pass
    workers.clear()


def worker_main(conn) -> None:
    """The worker: load vLLM with the arguments of the parent's ``start`` message, then serve
    ``generate``/``probs`` batches (both may be in flight together) until ``close`` or until the
    parent's end of the pipe closes."""
    _, llm_args = conn.recv()
    try:
        import vllm

        llm = vllm.LLM(**llm_args)
        engine = llm.llm_engine
        conn.send(("ready", {"vllm": vllm.__version__, "max_model_len": engine.model_config.max_model_len}))
    except BaseException as e:  # noqa: BLE001 - the parent gets the reason
        import traceback

        traceback.print_exc()
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    server = _Server(conn, engine)
    try:
        server.serve()
    finally:
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


class _Server:
    """Feeds the parent's batches to vLLM's engine and steps it, sending back what finishes.

    vLLM request ids: ``g<key>:<sample index>`` for generation, ``p<batch>:<position>`` for
    next-token probabilities (vLLM appends its own ``-<random>`` suffix internally)."""

    def __init__(self, conn, engine) -> None:
        self.conn, self.engine = conn, engine
        self.gen_left = 0  # samples of the generate batch still running
        self.probes: dict[int, dict] = {}  # probs batch -> {"left", "got", "cands"}
        self.next_batch = 0

    def serve(self) -> None:
        last = time.monotonic()
        while True:
            idle = not self.engine.has_unfinished_requests()
            while idle or self.conn.poll():
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    return  # the parent is gone
                if msg[0] == "close":
                    return
                self.handle(msg)
                idle = not self.engine.has_unfinished_requests()
            for output in self.engine.step():
                if output.finished:
                    self.finished(output)
            if time.monotonic() - last > 5.0:
                self.conn.send(("tick",))
                last = time.monotonic()

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "generate":
            try:
                self.add_generate(msg[1])
            except Exception as e:  # noqa: BLE001 - vLLM refused a request: drop the batch, stay usable
                self.refuse("generate", "g", e)
        elif kind == "probs":
            batch = self.next_batch
            self.next_batch += 1
            try:
                self.add_probs(batch, msg[1])
            except Exception as e:  # noqa: BLE001
                self.probes.pop(batch, None)
                self.refuse("probs", f"p{batch}:", e)
        elif kind == "abort":
            self.abort("g")
            self.gen_left = 0
            self.conn.send(("done",))

    def refuse(self, what: str, prefix: str, e: Exception) -> None:
        import traceback

        traceback.print_exc()
        self.abort(prefix)
        if what == "generate":
            self.gen_left = 0
        self.conn.send(("error", what, f"{type(e).__name__}: {e}"))

    def abort(self, prefix: str) -> None:
        ids = [rid for rid in getattr(self.engine.output_processor, "request_states", {}) if rid.startswith(prefix)]
        if ids:
            self.engine.abort_request(ids, internal=True)

    def add_generate(self, jobs: list[dict]) -> None:
        from vllm import SamplingParams

        added = 0
        for job in jobs:
            prompt = {"prompt_token_ids": job["prompt_token_ids"]}
            for index, seed in job["samples"]:
                params = SamplingParams(n=1, temperature=job["temperature"], top_p=job["top_p"], max_tokens=job["max_tokens"],
                                        stop=job["stop"] or None, seed=seed)
                self.engine.add_request(f"g{job['key']}:{index}", prompt, params)
                added += 1
        self.gen_left += added
        if not added:
            self.conn.send(("done",))

    def add_probs(self, batch: int, items: list[tuple[int, tuple[list[int], list[int]]]]) -> None:
        from vllm import SamplingParams

        self.probes[batch] = {"left": len(items), "got": [], "cands": {i: cand for i, (_, cand) in items}}
        for i, (ids, cand) in items:
            params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprob_token_ids=sorted(set(cand)))
            self.engine.add_request(f"p{batch}:{i}", {"prompt_token_ids": ids}, params)

    def finished(self, output) -> None:
        rid = output.request_id
        a, _, b = rid[1:].partition(":")
        first, second = int(a), int(b.split("-", 1)[0])
        c = output.outputs[0]
        if rid.startswith("g"):
            self.conn.send(("sample", first, second, c.text, c.finish_reason, len(c.token_ids)))
            self.gen_left -= 1
            if self.gen_left == 0:
                self.conn.send(("done",))
            return
        probe = self.probes[first]
        logprobs = c.logprobs[0]
        probe["got"].append((second, [math.exp(logprobs[t].logprob) for t in probe["cands"][second]]))
        probe["left"] -= 1
        if probe["left"] == 0:
            del self.probes[first]
            self.conn.send(("probs", probe["got"]))


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection

    worker_main(Connection(int(sys.argv[1])))
