"""`python -m runtime.serve cluster=ray`: two replicas of the tiny engine chain behind Ray Serve, on a
Ray that the server starts here with two CPUs, driven over HTTP by the openai client,
langchain_openai.ChatOpenAI and httpx: the same answers as the single server, both replicas used,
one replica killed mid-run, and a shutdown that leaves no Ray process behind."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

pytest.importorskip("ray.serve", reason="cluster=ray needs Ray Serve: pip install 'ray[serve]' (in the test extra)")

from .conftest import CONF_DIR, ROOT  # noqa: E402
from .servers import (DEPTH_POLICY, MODEL, TEXT, Server, audio_part, chat, eager_text, image_part, langchain_round_trip, png_url, user,  # noqa: E402
                         wav_b64)

pytestmark = [pytest.mark.heavy, pytest.mark.usefixtures("one_torch_thread")]


def compose_serve(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cli.command import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="serve", overrides=overrides))


@pytest.mark.parametrize("placement, gpus", [("cpu", 0), ("one_gpu", 1), ("two_gpu", 2)])
def test_replica_resources_follow_the_placement(placement, gpus):
    from cli.cluster import deployment_options

    cfg = compose_serve(["cluster=ray", f"runtime={placement}", "cluster.num_replicas=3"])
    options = deployment_options(cfg)
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": gpus}
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    # the engine's slots and queue (8 or 16, and 64): past them its own 429 answers
    assert options["max_ongoing_requests"] == cfg.runtime.max_batch_size + cfg.runtime.max_queue
    scaled = deployment_options(compose_serve(["cluster=ray", "cluster.autoscaling.enabled=true", "cluster.autoscaling.max_replicas=5"]))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 4.0}
    assert "num_replicas" not in scaled
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(compose_serve(["cluster=ray", "cluster.autoscaling.enabled=true", "cluster.autoscaling.min_replicas=3"]))


def test_the_kuberay_example_composes_into_the_deployment_it_describes():
    """The manifest is not run here (no Kubernetes): its Serve config must at least build."""
    from ray import serve

    from cli.cluster import deployment_options
    from runtime.serve import ray_app  # the documented import path of Serve's application builder

    manifest = yaml.safe_load((ROOT / "docs" / "kuberay-rayservice.yaml").read_text())
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "runtime.serve:ray_app"
    assert isinstance(ray_app(application["args"]), serve.Application)
    options = deployment_options(compose_serve(["cluster=ray", *application["args"]["overrides"]]))
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["autoscaling_config"]["max_replicas"] == 4
    env = {e["name"]: e.get("value") for e in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "runtime.cluster.proxy_middlewares"


def children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> dict[int, str]:
    """Every process below pid: pid -> command line."""
    tree, out, todo = children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RayServer(Server):
    """The Ray-backed server; it stops with SIGTERM, as a supervisor stops it, so that Ray stops too.
    Ready once every replica is (the first one answers /health before the second has loaded)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        deadline = time.monotonic() + 120
        while "through Ray Serve" not in self.logs():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.logs()[-3000:]
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a test already failed: leave nothing running either way
                for pid in descendants(self.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def replica_of(headers: httpx.Headers, body: dict | None = None) -> str:
    name = headers["x-dyngraph-replica"]
    if body is not None:
        assert body["dyngraph"]["replica"] == name
    return name


def pid_of(replica: str) -> int:
    return int(replica.split("/")[1].split("@")[0])  # <replica id>/<pid>@<node ip>


@pytest.fixture(scope="module")
def ray_server(tiny_engines_dir, tmp_path_factory):
    s = RayServer(tiny_engines_dir.parent.parent, tmp_path_factory.mktemp("logs") / "ray.log", "cluster=ray",
                  "cluster.num_replicas=2", "cluster.local_cpus=2", "cluster.health_check_period_s=1", *DEPTH_POLICY,
                  "runtime.max_batch_size=4", "runtime.policy.request_override=true", env={"DYNGRAPH_CPU_THREADS": "1"})
    yield s
    s.stop()


def test_the_openai_client_gets_the_single_servers_answers(ray_server, tiny_model):
    for exit_layer in (6, 24):
        body, headers = chat(ray_server, [{"role": "user", "content": TEXT[exit_layer]}], max_tokens=8, temperature=0)
        assert headers["x-dyngraph-path"] == body["dyngraph"]["path"] == f"exit{exit_layer}-text"
        assert body["choices"][0]["message"]["content"] == eager_text(tiny_model, TEXT[exit_layer], exit_layer, 8)[0]
        replica_of(headers, body)
    # streaming through Serve: a chunk per token, the same text, usage and path, the replica in the last chunk
    stream = ray_server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": TEXT[12]}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream.parse())
    whole, _ = chat(ray_server, [{"role": "user", "content": TEXT[12]}], max_tokens=10, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole["choices"][0]["message"]["content"]
    assert chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]
    assert chunks[-1].model_extra["dyngraph"]["replica"] == stream.headers["x-dyngraph-replica"]
    assert chunks[-1].model_extra["dyngraph"]["path"] == "exit12-text"


def test_thinking_image_and_audio(ray_server):
    extra = {"enable_thinking": True, "return_reasoning": True, "max_reasoning_steps": 3, "ignore_eos": True}
    body, _ = chat(ray_server, [{"role": "user", "content": "plan a trip"}], max_tokens=9, temperature=0, extra_body=extra)
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}  # 3 steps, then </think>
    stream = ray_server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "plan a trip"}],
                                                         max_tokens=9, temperature=0, stream=True, extra_body=extra)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == body["choices"][0]["message"]["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == body["choices"][0]["message"]["content"]
    for parts, path in (((image_part(png_url()),), "exit6-text+image"), ((audio_part(wav_b64(0.5)),), "exit6-text+audio")):
        body, headers = chat(ray_server, user("What is this?", *parts), max_tokens=4, temperature=0)
        assert headers["x-dyngraph-path"] == body["dyngraph"]["path"] == path
        replica_of(headers, body)


def test_langchain_chat_openai_as_the_seed_configures_it(ray_server):
    langchain_round_trip(ray_server.url)


def test_errors_are_the_single_servers_and_name_the_replica(ray_server):
    r = ray_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature" and replica_of(r.headers)
    r = ray_server.post(b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.get(f"{ray_server.url}/v1/nope").json()["error"]["code"] == "not_found"


def concurrently(server: Server, n: int, max_tokens: int) -> list[tuple[int, str | None]]:
    """n requests at once: (status, replica) each."""
    barrier, out = threading.Barrier(n), []

    def one(i):
        barrier.wait()
        r = server.post({"model": MODEL, "messages": [{"role": "user", "content": f"req {i}"}], "max_tokens": max_tokens,
                         "ignore_eos": True, "temperature": 0}, timeout=120)
        out.append((r.status_code, r.headers.get("x-dyngraph-replica")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_requests_reach_both_replicas_and_each_has_its_metrics(ray_server):
    results = concurrently(ray_server, 8, max_tokens=40)
    assert [status for status, _ in results] == [200] * 8
    replicas = {name for _, name in results}
    assert len(replicas) == 2, results
    seen: dict[str, float] = {}
    for _ in range(40):  # /metrics answers from the replica the request reached, named in its header
        r = httpx.get(f"{ray_server.url}/metrics", timeout=10)
        seen[r.headers["x-dyngraph-replica"]] = float(next(line.split()[-1] for line in r.text.splitlines()
                                                         if line.startswith('dyngraph_requests_total{status="200"}')))
        if set(seen) >= replicas:
            break
    assert set(seen) >= replicas and all(v >= 1 for v in seen.values()), seen


def test_a_killed_replica_fails_its_requests_clearly_and_comes_back(ray_server):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 1500, "temperature": 0}
    victim_stream = ray_server.client().chat.completions.with_raw_response.create(**long, stream=True, extra_body={"ignore_eos": True})
    victim = victim_stream.headers["x-dyngraph-replica"]
    chunks = victim_stream.parse()
    next(iter(chunks))
    survivor = next(name for name in iter(lambda: httpx.get(f"{ray_server.url}/health").headers["x-dyngraph-replica"], None)
                    if name != victim)
    # in flight on either replica while one dies: plain httpx (no retries) and the openai client (retries 503s)
    raw, retried = [], []
    posts = [threading.Thread(target=lambda: raw.append(ray_server.post({**long, "max_tokens": 800, "ignore_eos": True}, timeout=120))) for _ in range(4)]
    posts.append(threading.Thread(target=lambda: retried.append(openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="EMPTY", max_retries=2).chat.completions.create(
        **{**long, "max_tokens": 200}, extra_body={"ignore_eos": True}))))
    for t in posts:
        t.start()
    time.sleep(2)
    os.kill(pid_of(victim), signal.SIGKILL)
    with pytest.raises(openai.APIError, match="replica serving this request stopped"):
        for _ in chunks:  # the stream ends with the proxy's error event, not a cut connection
            pass
    # new requests succeed at once, on the survivor while Serve replaces the victim
    ok = ray_server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.headers["x-dyngraph-replica"] != victim
    for t in posts:
        t.join()
    assert {r.status_code for r in raw} <= {200, 503}
    for r in raw:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "replica_unavailable" and r.headers["retry-after"] == "1"
        else:  # a whole answer, never a cut one: from the survivor, or from the victim if it finished before the kill
            assert r.json()["usage"]["completion_tokens"] == 800
    assert retried[0].usage.completion_tokens == 200
    # Serve starts a replacement: a third name answers while the survivor keeps answering
    deadline, names = time.monotonic() + 90, set()
    while time.monotonic() < deadline:
        names.add(httpx.get(f"{ray_server.url}/health", timeout=10).headers["x-dyngraph-replica"])
        if names - {survivor, victim}:
            break
        time.sleep(0.2)
    assert names - {survivor, victim}, f"no replacement replica answered: {names}"
    assert victim not in names


def test_sigterm_drains_then_leaves_no_ray_process_behind(ray_server):
    below = descendants(ray_server.proc.pid)
    assert any("raylet" in c for c in below.values()) and any("ServeReplica" in c for c in below.values()), below
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{ray_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        ray_server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20  # the application goes; the proxy answers new requests with an OpenAI 503
        hi = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        while (refused := ray_server.post(hi)).status_code == 200:
            assert time.monotonic() < deadline
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_replica", refused.text
        data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"  # the in-flight stream finished first
    assert ray_server.proc.wait(timeout=90) == 0, ray_server.logs()[-3000:]
    deadline = time.monotonic() + 20
    while any(alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for p, c in below.items() if alive(p)]
