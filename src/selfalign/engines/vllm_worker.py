"""The two ends of a ``vllm`` engine worker: :class:`Worker` in the parent, :func:`worker_main` in the child.

The child is a fresh interpreter, ``python -m selfalign.engines.vllm_worker FD``, started in its
own session (so its process group also holds vLLM's engine-core and executor processes). Parent
and child talk over a ``multiprocessing`` pipe whose child end is the inherited descriptor FD.
Everything the child prints, vLLM's logs included, goes to a log file whose tail ends up in the
error when the worker fails.

Messages, parent to child: ``("start", llm_kwargs)`` once, then ``("generate", jobs)``,
``("probs", items)``, ``("abort",)`` while a batch runs, and ``("close",)``. Child to parent:
``("ready", info)`` or ``("fatal", reason)`` after start; per batch any number of
``("sample", key, index, text, finish_reason, completion_tokens)`` and ``("tick",)`` (a sign of
life every 5 s), then ``("probs", list)`` for a probs batch, and finally ``("done",)``, or
``("error", reason)`` when vLLM refused the batch (the worker dropped it and stays usable).
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
        """SIGKILL the worker's process group (vLLM's own engine and executor processes are in it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            pass


def log_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" Its log is {path}; the last lines:\n" + "\n".join(text) if text else f" Its log {path} is empty."


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()
        try:
            os.unlink(w.log_path)
        except OSError:
            pass
    workers.clear()


class _ParentGone(Exception):
    pass


def worker_main(conn) -> None:
    """The worker: load vLLM with the arguments of the parent's ``start`` message, then serve
    ``generate``/``probs`` until ``close`` (or until the parent's end of the pipe closes)."""
    kind, llm_args = conn.recv()
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
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone
            if msg[0] == "close":
                break
            try:
                if msg[0] == "generate":
                    _serve_generate(conn, engine, msg[1])
                elif msg[0] == "probs":
                    _serve_probs(conn, engine, msg[1])
                conn.send(("done",))
            except _ParentGone:
                break
            except Exception as e:  # noqa: BLE001 - reported, the worker stays usable
                import traceback

                traceback.print_exc()
                _abort_all(engine)
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


def _abort_all(engine) -> None:
    ids = list(getattr(engine.output_processor, "request_states", {}).keys())
    if ids:
        engine.abort_request(ids, internal=True)


def _run(conn, engine, on_finished) -> None:
    """Step the engine until its requests are done; an ``abort`` from the parent drops them."""
    last = time.monotonic()
    while engine.has_unfinished_requests():
        if conn.poll():
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                _abort_all(engine)
                raise _ParentGone from None
            if msg[0] in ("abort", "close"):
                _abort_all(engine)
                while engine.has_unfinished_requests():
                    engine.step()
                if msg[0] == "close":
                    raise _ParentGone
                return
        for output in engine.step():
            if output.finished:
                on_finished(output)
        if time.monotonic() - last > 5.0:
            conn.send(("tick",))
            last = time.monotonic()


def _request_key(request_id: str) -> tuple[int, int]:
    key, _, rest = request_id.partition(":")
    return int(key), int(rest.split("-", 1)[0])


def _serve_generate(conn, engine, jobs: list[dict]) -> None:
    from vllm import SamplingParams

    for job in jobs:
        prompt = {"prompt_token_ids": job["prompt_token_ids"]}
        for index, seed in job["samples"]:
            params = SamplingParams(n=1, temperature=job["temperature"], top_p=job["top_p"], max_tokens=job["max_tokens"],
                                    stop=job["stop"] or None, seed=seed)
            engine.add_request(f"{job['key']}:{index}", prompt, params)

    def finished(output) -> None:
        key, index = _request_key(output.request_id)
        c = output.outputs[0]
        conn.send(("sample", key, index, c.text, c.finish_reason, len(c.token_ids)))

    _run(conn, engine, finished)


def _serve_probs(conn, engine, items: list[tuple[int, tuple[list[int], list[int]]]]) -> None:
    from vllm import SamplingParams

    for i, (ids, cand) in items:
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprob_token_ids=sorted(set(cand)))
        engine.add_request(f"{i}:0", {"prompt_token_ids": ids}, params)
    wanted = dict(items)
    got: list[tuple[int, list[float]]] = []

    def finished(output) -> None:
        i, _ = _request_key(output.request_id)
        logprobs = output.outputs[0].logprobs[0]
        got.append((i, [math.exp(logprobs[c].logprob) for c in wanted[i][1]]))

    _run(conn, engine, finished)
    conn.send(("probs", got))


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection

    worker_main(Connection(int(sys.argv[1])))
