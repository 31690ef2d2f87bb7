"""The server's host work per token at batch 1, apart from the engines' own time.

The real server (cli/assemble.py build_service, serving/app.py run_server) runs in this process;
a client in a child process (its own interpreter, so its parsing takes no GIL from the server)
sends one request at a time: greedy, ignore_eos, at one exit. Timers wrapped around the runtime's
own functions (installed by this script, nothing in the library) split each decode step of the
engine thread into

  engines     Stepper.decode's engine runs (run_captured, cross_attention), launch and run
  step glue   the rest of Stepper.decode: plan, input ids, index copies, cache lengths
  sampling    Sampler.__call__ (the argmax and the ids' copy to the host)
  detokenise  TextStream.add
  push        RequestHandle.push (the event handed to the asyncio loop)
  take rest   the rest of GenerationEngine.take
  decode rest the rest of GenerationEngine.decode (speculation checks, metrics)
  loop        the engine loop between two decode steps of the same request

each exclusive of the others (push counts as push wherever it is called from), on the wall clock
and on the engine thread's own CPU clock (the wall clock's excess is time spent waiting for the
GIL or descheduled); and read the CPU time of the asyncio thread (time.pthread_getcpuclockid)
around each request: everything the HTTP side does, from an event's arrival to its bytes on the
socket. The asyncio figure per token is the slope between a short and a long request, so that
what a request costs once (parsing, tokenising, prefill, the response's start) drops out.

Three ways of consuming a request's tokens:
  engine   GenerationEngine.submit with a bare asyncio consumer on another thread: the scheduler alone
  stream   POST /v1/chat/completions with stream=true (SSE)
  collect  the same with stream=false (one JSON body)
The client's ms/token (first to last token for engine and stream, the whole request's slope for
collect) of stream against engine is the server's share as a client sees it.

    python scripts/server_overhead.py --engines-dir /tmp/spec-engines                  # tiny, CPU
    python scripts/server_overhead.py --engines-dir /data/engines +preset=phone-9b-gpu  # on the GPU host
    python scripts/server_overhead.py --profile stream                                  # and the asyncio thread's cProfile

Extra arguments are the serve command's overrides (python -m runtime.serve ...).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing
import os
import pstats
import signal
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEP_PARTS = ("engines", "step glue", "sampling", "detokenise", "push", "take rest", "decode rest", "loop")


# --- the client: a child process ---------------------------------------------------------------------


def client(url: str, bodies: list[dict]) -> list[dict]:
    """Each body in turn: when it was sent, when each SSE data line (or the whole body) came, the text."""
    import httpx

    out = []
    with httpx.Client(timeout=600) as http:
        for body in bodies:
            sent = time.perf_counter()
            arrivals, chunks = [], []
            if body.get("stream"):
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            arrivals.append(time.perf_counter())
                            chunks.append(line[6:])
                text = "".join(json.loads(c)["choices"][0]["delta"].get("content") or "" for c in chunks[1:-1] if c != "[DONE]")
            else:
                r = http.post(f"{url}/v1/chat/completions", json=body)
                r.raise_for_status()
                arrivals.append(time.perf_counter())
                text = r.json()["choices"][0]["message"]["content"]
            out.append({"sent": sent, "arrivals": arrivals, "text": text})
    return out


# --- timers around the engine thread's functions -------------------------------------------------------


class StepTimers:
    """Per decode step of the engine thread: each part's exclusive (wall, CPU) seconds (a timed call
    inside another counts for itself only, wherever the code nests it). The engine thread's own CPU
    clock leaves out the time it was descheduled (other processes on a shared machine) or waited
    for the GIL; the wall clock counts both."""

    def __init__(self):
        self.steps: list[dict[str, list[float]]] = []
        self.current: dict[str, list[float]] | None = None
        self.stack: list[list[float]] = []  # the timed calls in progress: [wall, cpu, children's wall, children's cpu]
        self.last_end: tuple[float, float] | None = None
        self.last_members: tuple = ()
        self.active = False  # only while a measured request runs
        self.profiler: cProfile.Profile | None = None  # profiles the engine thread's decode steps while set

    def timed(self, f, part: str):
        def timed(*args, **kwargs):
            if self.current is None:
                return f(*args, **kwargs)
            frame = [time.perf_counter(), time.thread_time(), 0.0, 0.0]
            self.stack.append(frame)
            try:
                return f(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - frame[0], time.thread_time() - frame[1]
                self.stack.pop()
                if self.current is not None:
                    spent = self.current[part]
                    spent[0] += wall - frame[2]
                    spent[1] += cpu - frame[3]
                if self.stack:
                    self.stack[-1][2] += wall
                    self.stack[-1][3] += cpu

        return timed

    def wrap(self, owner, name: str, part: str) -> None:
        """owner.name (a function of an instance or a class) counted as `part` inside a decode step."""
        setattr(owner, name, self.timed(getattr(owner, name), part))

    def install(self, engine) -> None:
        from runtime.requests import RequestHandle
        from runtime.sampling import Sampler
        from runtime.text import TextStream

        stepper = engine.stepper
        self.wrap(stepper, "run_captured", "engines")
        self.wrap(stepper, "cross_attention", "engines")
        self.wrap(stepper, "decode", "step glue")
        self.wrap(Sampler, "__call__", "sampling")
        self.wrap(TextStream, "add", "detokenise")
        self.wrap(RequestHandle, "push", "push")
        self.wrap(engine, "take", "take rest")
        decode = self.timed(engine.decode, "decode rest")

        def timed_decode():
            wall, cpu = time.perf_counter(), time.thread_time()
            members = tuple(s.number for s in engine.running)
            self.current = defaultdict(lambda: [0.0, 0.0])
            profiler = self.profiler if self.active else None
            if profiler is not None:
                profiler.enable()
            try:
                decode()
            finally:
                if profiler is not None:
                    profiler.disable()
                step, self.current = self.current, None
                if self.active:
                    if members == self.last_members and self.last_end is not None:
                        step["loop"] = [wall - self.last_end[0], cpu - self.last_end[1]]
                    self.steps.append(step)
                self.last_end, self.last_members = (time.perf_counter(), time.thread_time()), members

        engine.decode = timed_decode

    def parts(self) -> dict[str, list[list[float]]]:
        """Each part's [wall, CPU] seconds per step."""
        return {p: [s.get(p, [0.0, 0.0]) for s in self.steps if p != "loop" or p in s] for p in STEP_PARTS}


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


# --- the measurement, on a thread beside the server ---------------------------------------------------


def body(args, model_id: str, tokens: int, stream: bool) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": args.prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream, "exit_layer": args.exit_layer}


def engine_alone(service, args, tokens: int) -> tuple[float, list[float]]:
    """One request submitted to the scheduler directly, its events taken by a bare asyncio loop:
    (start time, each token's arrival)."""
    from runtime.requests import Delta, Failed, Finished, GenerationRequest
    from runtime.sampling import SamplingParams

    tok = service.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    request = GenerationRequest(prompt, tokens, sampling=SamplingParams(temperature=0.0), ignore_eos=True,
                                policy_text=args.prompt, exit_layer=args.exit_layer, request_id="engine-alone")

    async def consume():
        arrivals = []
        start = time.perf_counter()
        handle = service.engine.submit(request, asyncio.get_running_loop())
        while True:
            event = await handle.next()
            if isinstance(event, Delta):
                arrivals.append(time.perf_counter())
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)
            elif isinstance(event, Finished):
                return start, arrivals

    try:  # the loop uvicorn's "auto" takes
        import uvloop
    except ImportError:
        return asyncio.run(consume())
    return uvloop.run(consume())


def measure(service, args, url: str, server_thread: threading.Thread) -> dict:
    engine = service.engine.engine
    timers = StepTimers()
    timers.install(engine)
    model_id = service.server.model_id
    short, long = args.short, args.tokens
    pool = multiprocessing.get_context("spawn").Pool(1)
    results = {}
    try:
        pool.apply(client, (url, [body(args, model_id, 4, True), body(args, model_id, 4, False)]))  # warm both routes
        for mode in args.modes:
            cpu, wall, steps, per_token = {}, {}, [], []
            for tokens in [short, long] * args.repeats:
                timers.steps, timers.last_end, timers.active = [], None, tokens == long
                if args.profile == "engine" and mode == "stream" and tokens == long and timers.profiler is None:
                    timers.profiler = service.engine_profiler = cProfile.Profile()
                elif timers.profiler is not None:
                    timers.profiler = None
                consumer = threading.current_thread() if mode == "engine" else server_thread  # the thread taking the events
                cpu0 = thread_cpu(consumer)
                if mode == "engine":
                    start, arrivals = engine_alone(service, args, tokens)
                    end = arrivals[-1]
                else:
                    if args.profile == mode and tokens == long:
                        service.profiler = cProfile.Profile()
                    [r] = pool.apply(client, (url, [body(args, model_id, tokens, mode == "stream")]))
                    start, arrivals, end = r["sent"], r["arrivals"], r["arrivals"][-1]
                    if mode == "stream":
                        arrivals = arrivals[1:-2]  # the role chunk, then one per token; the finish chunk and [DONE] last
                        assert len(arrivals) == tokens, (len(arrivals), tokens)
                cpu.setdefault(tokens, []).append(thread_cpu(consumer) - cpu0)
                wall.setdefault(tokens, []).append(end - start)
                if tokens == long:
                    steps.append(timers.parts())
                    if len(arrivals) == tokens:
                        per_token.append((arrivals[-1] - arrivals[0]) / (tokens - 1))
            slope = lambda d: (statistics.median(d[long]) - statistics.median(d[short])) / (long - short)  # noqa: E731
            parts = {p: [v for s in steps for v in s.get(p, [])] for p in STEP_PARTS}
            results[mode] = {
                "asyncio_cpu_us_per_token": 1e6 * slope(cpu),
                "ms_per_token": 1e3 * (statistics.median(per_token) if per_token else slope(wall)),
                "engine_thread_us_per_step": {p: {f"{clock}_{stat}": 1e6 * f([x[i] for x in v])
                                                  for i, clock in enumerate(("wall", "cpu"))
                                                  for stat, f in (("mean", statistics.fmean), ("median", statistics.median))}
                                              for p, v in parts.items() if v},
            }
    finally:
        pool.close()
    return results


def report(results: dict, args) -> str:
    lines = [f"batch 1, exit {args.exit_layer}, {args.tokens} tokens against {args.short} (asyncio slope), {args.repeats} repeats"]
    modes = list(results)
    lines.append(f"{'':26}" + "".join(f"{m:>22}" for m in modes))
    lines.append(f"{'client ms/token':26}" + "".join(f"{results[m]['ms_per_token']:22.3f}" for m in modes))
    lines.append(f"{'asyncio CPU us/token':26}" + "".join(f"{results[m]['asyncio_cpu_us_per_token']:22.1f}" for m in modes))
    lines.append("engine thread, us per decode step, median (wall / CPU), mean CPU:")
    for p in STEP_PARTS:
        row = [results[m]["engine_thread_us_per_step"].get(p) for m in modes]
        lines.append(f"  {p:24}" + "".join(f"{r['wall_median']:8.1f} /{r['cpu_median']:6.1f} {r['cpu_mean']:6.1f}" if r else f"{'-':>22}"
                                          for r in row))
    for stat in ("median", "mean"):
        host = [sum(results[m]["engine_thread_us_per_step"][p][f"cpu_{stat}"] for p in STEP_PARTS[1:]
                    if p in results[m]["engine_thread_us_per_step"]) for m in modes]
        lines.append(f"  {'host CPU but engines, ' + stat:24}" + "".join(f"{h:22.1f}" for h in host))
    return "\n".join(lines)


# --- the server in this process ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines-dir", default=os.environ.get("DYNGRAPH_TEST_ENGINES", "engines"))
    parser.add_argument("--exit-layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the long request (the one whose steps are timed)")
    parser.add_argument("--short", type=int, default=32, help="tokens of the short request (the asyncio slope's other end)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="Open the camera")
    parser.add_argument("--modes", nargs="+", default=["engine", "stream", "collect"], choices=["engine", "stream", "collect"])
    parser.add_argument("--profile", choices=["stream", "collect", "engine"],
                        help="cProfile the asyncio thread over one long request of that mode, or (engine) the engine thread's "
                             "decode steps over one long streamed request")
    parser.add_argument("--cpu-threads", default="1", help="ONNX Runtime's CPU threads (DYNGRAPH_CPU_THREADS)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args, overrides = parser.parse_known_args()
    os.environ.setdefault("DYNGRAPH_CPU_THREADS", args.cpu_threads)

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cli.assemble import build_service
    from cli.command import CONF_DIR
    from serving.app import bind_socket, run_server
    from serving.chat import ChatService

    torch.set_num_threads(1)  # as runtime.serve
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="serve", overrides=[f"engines_dir={args.engines_dir}", "server.host=127.0.0.1",
                                                      "runtime.policy.request_override=true", *overrides])
    app = OmegaConf.to_object(cfg)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = app.server.port = s.getsockname()[1]
    sock = bind_socket(app.server)
    service = build_service(app, "python -m pipeline export")

    # the cProfile of the asyncio thread: switched on by the stream's or the collection's first step, in that thread
    service.profiler = None
    for name in ("stream", "collect"):
        original = getattr(ChatService, name)
        if name == "stream":
            async def profiled(self, run, _f=original):
                if self.profiler is not None:
                    self.profiler.enable()
                try:
                    async for item in _f(self, run):
                        yield item
                finally:
                    if self.profiler is not None:
                        self.profiler.disable()
        else:
            async def profiled(self, run, disconnected, _f=original):
                if self.profiler is not None:
                    self.profiler.enable()
                try:
                    return await _f(self, run, disconnected)
                finally:
                    if self.profiler is not None:
                        self.profiler.disable()
        setattr(ChatService, name, profiled)

    main_thread = threading.current_thread()
    outcome = {}

    def drive():
        import httpx

        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            outcome["results"] = measure(service, args, url, main_thread)
        except BaseException as e:
            outcome["error"] = e
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # the server drains and stops

    threading.Thread(target=drive, name="driver", daemon=True).start()
    run_server(service, sock)
    if "error" in outcome:
        raise outcome["error"]
    results = outcome["results"]
    print(report(results, args))
    if getattr(service, "engine_profiler", None) is not None:
        print(f"\nengine thread, cProfile over the decode steps of one streamed request of {args.tokens} tokens (profiled, so slower):")
        pstats.Stats(service.engine_profiler).sort_stats("tottime").print_stats(30)
    if service.profiler is not None:
        print(f"\nasyncio thread, cProfile over one {args.profile} request of {args.tokens} tokens (profiled, so slower):")
        pstats.Stats(service.profiler).sort_stats("tottime").print_stats(25)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "overrides": overrides, "results": results}, indent=1))


if __name__ == "__main__":
    main()
