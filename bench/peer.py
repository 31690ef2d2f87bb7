"""The peer: ONNX Runtime GenAI, ONNX Runtime's own LLM runtime, on a decoder of our dims.

What a user could pick instead of our engine chain: the same runtime library, with the graphs
its model builder emits (GroupQueryAttention over past/present buffers shared in place, fused
norms, packed QKV) and its generator loop (CUDA graphs on CUDA). The bench builds it in the same
run, on the same device and in the same precision as the engines, and times batch-1 decode and
prefill at the workload's prompt lengths.

Per depth (the first exit and the full depth by default), one at a time because phone-9b's
checkpoint and build take ~16 GB of disk each:

1. a random-weight Hugging Face Llama with the decoder's dims (hidden, query and KV heads, head
   size, FFN, vocabulary, rope theta, norm eps), drawn from `model.seed`, with a minimal tokenizer
   for the builder to copy (the timing feeds token ids);
2. `python -m onnxruntime_genai.models.builder` on it (precision from the engines' dtype,
   execution provider from the servers' device); the checkpoint is deleted as soon as it is built;
3. `python -m bench.peer time SPEC` times the build (CUDA graphs on, then off); the build is
   deleted afterwards, whatever happened.

The Llama layout differs from GLM's only where the bytes are negligible: no q/k/v biases (GLM's
are 0.02% of a layer) and rotary over the whole head instead of its first half.
Builder and timing run as subprocesses: a crash there costs this yardstick, not the run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the timing worker imports this module too: it needs neither torch nor Hydra
    from model.glm import ModelArgs
    from model.tokenizer import ChatTokenizer
    from contract.config import BenchApp, PeerSettings
    from contract.manifest import Manifest
    from bench.workload import BenchRequest

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BUILDER = "onnxruntime_genai.models.builder"
DISTRIBUTIONS = ("onnxruntime-genai-cuda", "onnxruntime-genai")  # the CUDA build first: it has both providers
SHM = Path("/dev/shm")


class PeerSkipped(Exception):
    """The peer cannot be measured here (or one depth failed); the message, in the report, says why."""


# --- which depths, which package ------------------------------------------------------------


def peer_layers(text: ModelArgs, cfg: PeerSettings) -> list[int]:
    """The depths to build: `cfg.layers`, or the first exit and the full depth."""
    return list(cfg.layers) if cfg.layers is not None else sorted({text.exit_layers[0], text.n_layers})


def check_settings(text: ModelArgs, cfg: PeerSettings) -> None:
    """Raise ValueError naming the first bad bench.peer setting (before any work starts)."""
    layers = peer_layers(text, cfg)
    if not layers or any(not 1 <= n <= text.n_layers for n in layers):
        raise ValueError(f"bench.peer.layers={layers} must list depths in 1..{text.n_layers} (model.text.n_layers)")
    if cfg.decode_tokens < 2:
        raise ValueError(f"bench.peer.decode_tokens={cfg.decode_tokens} must be at least 2")
    if cfg.timeout_s <= 0:
        raise ValueError(f"bench.peer.timeout_s={cfg.timeout_s} must be positive")


def installed_package(device: str) -> tuple[str, str]:
    """(distribution, version) of the ORT GenAI build that can run on `device`, else PeerSkipped."""
    if find_spec("onnxruntime_genai") is None:
        raise PeerSkipped("onnxruntime_genai is not installed: pip install -e '.[peer]' (CPU) or '.[peer-cuda]' (GPU)")
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if device.startswith("cuda") and "onnxruntime-genai-cuda" not in found:
        have = ", ".join(f"{d} {v}" for d, v in found.items()) or "an onnxruntime_genai without package metadata"
        raise PeerSkipped(f"the engines ran on {device} but only {have} is installed, which has no CUDA provider: "
                          "pip install -e '.[peer-cuda]' (onnxruntime-genai-cuda, on onnxruntime-gpu)")
    dist = next(iter(found), "onnxruntime-genai")
    return dist, found.get(dist, "unknown")


# --- the workload's prompt lengths ------------------------------------------------------------


def prompt_lengths(requests: list[BenchRequest], tokenizer: ChatTokenizer) -> dict[str, list[int]]:
    """Prompt tokens of each text-only request, per workload group, as the server's template makes them."""
    groups: dict[str, list[int]] = {}
    for r in requests:
        if r.text_only:
            groups.setdefault(r.group, []).append(len(tokenizer.apply_chat_template(r.messages())))
    return groups


# --- 1. the checkpoint ----------------------------------------------------------------------


def llama_parameters(text: ModelArgs, layers: int) -> int:
    """Parameters of the Llama `llama_config` describes (embedding and LM head untied)."""
    d, q, kv = text.dim, text.n_heads * text.head_dim, text.n_kv_heads * text.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * text.ffn_dim + 2 * d  # q, k, v, o; gate, up, down; two norms
    return 2 * text.vocab_size * d + layers * layer + d


def step_weight_bytes(text: ModelArgs, layers: int, dtype: str) -> int:
    """Bytes of weights a batch-1 decode step reads, counted as for our paths: one embedding row, not the table."""
    from contract.engines import DTYPE_BYTES

    return (llama_parameters(text, layers) - text.vocab_size * text.dim + text.dim) * DTYPE_BYTES[dtype]


def llama_config(text: ModelArgs, layers: int, max_positions: int):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=text.dim, intermediate_size=text.ffn_dim, num_hidden_layers=layers, num_attention_heads=text.n_heads,
        num_key_value_heads=text.n_kv_heads, head_dim=text.head_dim, vocab_size=text.vocab_size, rms_norm_eps=text.norm_eps,
        rope_theta=text.rope_theta, max_position_embeddings=max_positions,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def write_checkpoint(text: ModelArgs, layers: int, seed: int, dtype: str, device: str, max_positions: int, directory: Path) -> int:
    """A random-weight Llama checkpoint (safetensors) and a minimal tokenizer in `directory`; its parameter count."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from contract.engines import EXPORT_DTYPES

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):  # drawn where it runs: phone-9b's 24 layers take seconds on a GPU
        model = transformers.AutoModelForCausalLM.from_config(llama_config(text, layers, max_positions), dtype=EXPORT_DTYPES[dtype])
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    # the builder copies a tokenizer next to the model; the timing feeds ids, so three tokens do
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return parameters


# --- disk -------------------------------------------------------------------------------------


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def plan_dirs(cfg: PeerSettings, model_bytes: int) -> tuple[Path, Path]:
    """(checkpoint parent, build parent), each with room for its copy of the weights.

    The checkpoint is read once, by the builder: when the work directory's filesystem cannot hold
    it beside the build, it goes to /dev/shm (memory) if that has room."""
    need = int(model_bytes * 1.02) + (16 << 20)  # one copy: the checkpoint, or the build
    workdir = Path(cfg.workdir or tempfile.gettempdir()).expanduser()
    if not workdir.is_dir():
        raise PeerSkipped(f"bench.peer.workdir={workdir} is not a directory")
    if cfg.checkpoint_dir:
        ckpt = Path(cfg.checkpoint_dir).expanduser()
        if not ckpt.is_dir():
            raise PeerSkipped(f"bench.peer.checkpoint_dir={ckpt} is not a directory")
    elif free_bytes(workdir) < 2 * need and SHM.is_dir() and free_bytes(SHM) >= need:
        ckpt = SHM
    else:
        ckpt = workdir
    shared = os.stat(ckpt).st_dev == os.stat(workdir).st_dev
    for where in dict.fromkeys((ckpt, workdir)):
        needed = 2 * need if shared else need
        if free_bytes(where) < needed:
            raise PeerSkipped(f"the peer's checkpoint and build need {needed / 2**30:.1f} GiB in {where}, which has "
                              f"{free_bytes(where) / 2**30:.1f} GiB free: set bench.peer.workdir (and bench.peer.checkpoint_dir)")
    return ckpt, workdir


# --- 2. and 3. the builder and the timing, as subprocesses ---------------------------------


def worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"  # a local checkpoint: nothing to download
    if device.startswith("cuda"):
        # the one GPU the engines ran on, as device 0, through the bench's own numbering of GPUs
        index = int(device.partition(":")[2] or 0)
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


def run_logged(command: list[str], env: dict, log_path: Path, timeout_s: float, what: str) -> float:
    """Run `command` with its output in `log_path`; its wall time, or PeerSkipped saying how it failed."""
    t0 = time.perf_counter()
    with log_path.open("ab") as out:
        out.write(("$ " + " ".join(command) + "\n").encode())
        out.flush()
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PeerSkipped(f"{what} ran past bench.peer.timeout_s={timeout_s:.0f} s (log: {log_path.name})") from None
    if result.returncode != 0:
        raise PeerSkipped(f"{what} failed with exit code {result.returncode}: {last_line(log_path)} (log: {log_path.name})")
    return time.perf_counter() - t0


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def build(checkpoint: Path, out: Path, dtype: str, device: str, log_path: Path, timeout_s: float) -> float:
    provider = "cuda" if device.startswith("cuda") else "cpu"
    command = [sys.executable, "-m", BUILDER, "-i", str(checkpoint), "-o", str(out), "-p", dtype, "-e", provider,
               "-c", str(out.parent / "builder-cache"), "--extra_options", "hf_token=false"]
    return run_logged(command, worker_env(device), log_path, timeout_s, f"ORT GenAI's model builder ({dtype}, {provider})")


@dataclass
class TimingSpec:
    """What `python -m bench.peer time SPEC` measures; written as JSON beside the build."""

    model_dir: str
    provider: str  # cpu | cuda
    cuda_graph: bool
    prompt_lengths: list[int]
    decode_tokens: int
    vocab_size: int
    seed: int
    threads: int  # intra-op threads on the CPU as the engines get them (DYNGRAPH_CPU_THREADS); 0: ORT's default
    result: str


def time_build(spec: TimingSpec, device: str, log_path: Path, timeout_s: float) -> dict:
    spec_path = Path(spec.result).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(asdict(spec)))
    run_logged([sys.executable, "-m", "bench.peer", "time", str(spec_path)], worker_env(device), log_path, timeout_s,
               f"timing ORT GenAI ({'CUDA graphs' if spec.cuda_graph else 'no CUDA graphs'})")
    return json.loads(Path(spec.result).read_text())


# --- the whole peer, one depth at a time ---------------------------------------------------


def run_peer(app: BenchApp, manifest: Manifest, groups: dict[str, list[int]], device: str, log_dir: Path, console: Console) -> dict:
    """Build, time and delete the peer at each depth of bench.peer.layers, in the engines' dtype on
    `device`, at the prompt lengths of `groups` (prompt tokens per workload group, prompt_lengths'
    form); a depth that fails is recorded, not raised."""
    cfg, text, dtype = app.bench.peer, app.model.text, manifest.dtype
    if manifest.model["config"]["text"] != asdict(text):
        raise PeerSkipped("the bench's model.text config differs from the exported one: pass the export's model overrides to the bench")
    dist, version = installed_package(device)
    if not groups:
        raise PeerSkipped("the workload has no text-only requests")
    lengths = sorted({n for g in groups.values() for n in g})
    provider = "cuda" if device.startswith("cuda") else "cpu"
    graphs = [False]  # no CUDA graphs on the CPU
    if provider == "cuda":
        graphs = [cfg.cuda_graph] + ([False] if cfg.cuda_graph and cfg.also_without_graph else [])
    max_positions = max(app.export.max_context, lengths[-1] + cfg.decode_tokens + 1)
    depths = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<48}"), TimeElapsedColumn(), console=console, disable=not app.progress)
    with progress:
        for layers in peer_layers(text, cfg):
            task = progress.add_task(f"peer {layers} layers: checkpoint", total=None)
            try:
                depths.append(one_depth(app, layers, device, dtype, provider, graphs, lengths, max_positions, log_dir,
                                        lambda stage, t=task, n=layers: progress.update(t, description=f"peer {n} layers: {stage}")))
                timed = ", ".join(f"{r['decode_step_s']['median'] * 1e3:.2f} ms/token" + (" with CUDA graphs" if r["cuda_graph"] else "")
                                  for r in depths[-1]["runs"] if "skipped" not in r)
                console.print(f"peer {layers} layers: decode {timed}; build {depths[-1]['build_s']:.0f} s, deleted")
            except PeerSkipped as e:
                log.warning("peer at %d layers: %s", layers, e)
                depths.append({"layers": layers, "skipped": str(e)})
            except Exception as e:  # noqa: BLE001 - out of memory writing the checkpoint, say: the other depths still count
                log.warning("peer at %d layers failed: %s: %s", layers, type(e).__name__, e)
                depths.append({"layers": layers, "skipped": f"it failed: {type(e).__name__}: {e}"})
            finally:
                progress.remove_task(task)
    return {"implementation": f"{dist} {version}, model builder and generator (greedy, batch 1)", "package": dist, "version": version,
            "device": device, "provider": provider, "dtype": dtype, "decode_tokens": cfg.decode_tokens,
            "architecture": "Llama with the decoder's dims: no q/k/v biases, rotary over the whole head",
            "prompt_lengths": groups, "depths": depths}


def one_depth(app: BenchApp, layers: int, device: str, dtype: str, provider: str, graphs: list[bool], lengths: list[int],
              max_positions: int, log_dir: Path, stage) -> dict:
    from contract.engines import DTYPE_BYTES

    cfg, text = app.bench.peer, app.model.text
    weight_bytes = step_weight_bytes(text, layers, dtype)
    ckpt_parent, work_parent = plan_dirs(cfg, llama_parameters(text, layers) * DTYPE_BYTES[dtype])
    work = Path(tempfile.mkdtemp(prefix=f"dyngraph-peer-{layers}-", dir=work_parent))
    ckpt = Path(tempfile.mkdtemp(prefix=f"dyngraph-peer-{layers}-ckpt-", dir=ckpt_parent))
    try:
        t0 = time.perf_counter()
        parameters = write_checkpoint(text, layers, app.model.seed, dtype, device, max_positions, ckpt)
        checkpoint_s, checkpoint_bytes = time.perf_counter() - t0, directory_bytes(ckpt)
        stage("model builder")
        logs = [f"peer-build-{layers}.log"]
        build_s = build(ckpt, work / "model", dtype, device, log_dir / logs[0], cfg.timeout_s)
        shutil.rmtree(ckpt, ignore_errors=True)  # before timing: the disk holds one copy at a time
        build_bytes = directory_bytes(work / "model")
        runs = []
        for graph in graphs:
            stage("timing" + (" (CUDA graphs)" if graph else " (no CUDA graphs)" if provider == "cuda" else ""))
            spec = TimingSpec(str(work / "model"), provider, graph, lengths, cfg.decode_tokens, text.vocab_size, app.model.seed,
                              int(os.environ.get("DYNGRAPH_CPU_THREADS", "0")), str(work / f"timing-{int(graph)}.json"))
            logs.append(f"peer-time-{layers}{'-graph' if graph else ''}.log")
            try:
                runs.append(time_build(spec, device, log_dir / logs[-1], cfg.timeout_s))
            except PeerSkipped as e:  # one setting failing (graph capture, say) leaves the other's figure standing
                log.warning("peer at %d layers, %s: %s", layers, "CUDA graphs" if graph else "no CUDA graphs", e)
                runs.append({"provider": provider, "cuda_graph": graph, "skipped": str(e)})
        if all("skipped" in r for r in runs):
            raise PeerSkipped(runs[0]["skipped"])
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"layers": layers, "parameters": parameters, "step_weight_bytes": weight_bytes, "checkpoint_s": checkpoint_s,
            "checkpoint_bytes": checkpoint_bytes, "build_s": build_s, "build_bytes": build_bytes, "deleted": not (ckpt.exists() or work.exists()),
            "logs": logs, "runs": runs}


# --- the timing worker: python -m bench.peer time SPEC ------------------------------------


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def time_model(spec: TimingSpec) -> dict:
    """Batch-1 prefill and decode of one ORT GenAI build.

    Per workload prompt length, two fresh generators one after the other. ONNX Runtime's first run
    at a sequence length it has not seen costs many times the prefill itself on CUDA, and a server
    that has run a while has seen most lengths: so the first generator is that length's warm-up,
    its time to first token kept apart as `first_call_ttft_s`, and the second gives the figures:
    `prefill_s`, append_tokens alone (the prompt's forward, which returns once the device is done:
    the session's run synchronises the provider's stream at its end), and `ttft_s`, append_tokens +
    generate_next_token + get_next_tokens (the greedy pick over the prompt's last logits, no
    second forward, and the id on the host). Then `decode_tokens` steps, each generate_next_token + get_next_tokens: one
    forward, the greedy pick and the id's copy to the host, as a server needs it (the median: a
    new generator captures its own CUDA graph at its first steps). One max_length for every
    generator, so that the KV buffers (shared past/present) keep their shapes.
    """
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec.model_dir)
    if spec.provider == "cuda":
        if not og.is_cuda_available():
            raise RuntimeError(f"onnxruntime-genai {og.__version__} here has no CUDA provider: install onnxruntime-genai-cuda")
        config.clear_providers()
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if spec.cuda_graph else "0")
    if spec.threads and spec.provider == "cpu":
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec.threads}}}}))
    t0 = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    max_length = max(spec.prompt_lengths) + spec.decode_tokens + 1
    rng = np.random.default_rng(spec.seed)

    def generate(prompt: int, steps: int) -> tuple[float, float, list[float]]:
        """(append_tokens alone, time to the first id on the host, each decode step) of a fresh generator."""
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        ids = rng.integers(0, spec.vocab_size, size=(1, prompt), dtype=np.int32)  # [1, S]
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        prefill = time.perf_counter() - t0
        generator.generate_next_token()
        generator.get_next_tokens()
        ttft = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            generator.generate_next_token()
            generator.get_next_tokens()
            times.append(time.perf_counter() - t)
        if generator.token_count() != prompt + 1 + steps:
            raise RuntimeError(f"the generator holds {generator.token_count()} tokens, {prompt + 1 + steps} were generated")
        del generator  # frees its KV buffers (and a captured graph) before the next one
        return prefill, ttft, times

    generate(spec.prompt_lengths[0], min(8, spec.decode_tokens))  # warm-up: kernels, allocator, graph capture
    prefill, steps = [], []
    for prompt in spec.prompt_lengths:
        _, first_call, _ = generate(prompt, 0)  # this length's warm-up: ONNX Runtime's first run at it
        prefill_s, ttft, times = generate(prompt, spec.decode_tokens)
        prefill.append({"prompt_tokens": prompt, "prefill_s": prefill_s, "ttft_s": ttft, "first_call_ttft_s": first_call,
                        "decode_step_s": statistics.median(times)})
        steps += times
    return {"package_version": og.__version__, "provider": spec.provider, "cuda_graph": spec.cuda_graph, "load_s": load_s,
            "max_length": max_length, "prefill": prefill,
            "decode_step_s": {"median": statistics.median(steps), "mean": statistics.fmean(steps), "p10": percentile(steps, 0.1),
                              "p90": percentile(steps, 0.9), "n": len(steps)}}


def build_beside(engines_dir: Path, layers: int, out: Path, device: str) -> Path:
    """The peer of an export's decoder dims at `layers` layers, in its dtype, built into `out`/model
    and kept (what scripts/peer_profile.py reads); the checkpoint is deleted."""
    from contract.manifest import Manifest
    from model.glm import ModelArgs

    manifest = Manifest.load(engines_dir)
    text = ModelArgs(**manifest.model["config"]["text"])
    if not 1 <= layers <= text.n_layers:
        raise PeerSkipped(f"layers={layers} must be in 1..{text.n_layers}")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(tempfile.mkdtemp(prefix=f"dyngraph-peer-{layers}-ckpt-", dir=out))
    try:
        write_checkpoint(text, layers, 0, manifest.dtype, device, manifest.dims["capacity"]["max"], checkpoint)  # random weights: a profile reads no values
        build(checkpoint, out / "model", manifest.dtype, device, out / "build.log", timeout_s=3600)
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return out / "model"


USAGE = """usage: python -m bench.peer time SPEC.json           (the bench runs this; see bench.peer)
       python -m bench.peer build ENGINES_DIR LAYERS OUT [DEVICE]   (the peer of an export's dims, kept in OUT/model)"""


def main(argv: list[str]) -> int:
    if len(argv) in (4, 5) and argv[0] == "build":
        try:
            model = build_beside(Path(argv[1]), int(argv[2]), Path(argv[3]), argv[4] if len(argv) == 5 else "cuda:0")
        except (PeerSkipped, ValueError, FileNotFoundError) as e:
            print(f"the peer was not built: {e}", file=sys.stderr)
            return 2
        print(f"built {model}")
        return 0
    if len(argv) != 2 or argv[0] != "time":
        print(USAGE, file=sys.stderr)
        return 2
    spec = TimingSpec(**json.loads(Path(argv[1]).read_text()))
    result = time_model(spec)
    Path(spec.result).write_text(json.dumps(result))
    prefill = ", ".join(f"{p['prompt_tokens']}: {p['ttft_s'] * 1e3:.2f} ms (first call {p['first_call_ttft_s'] * 1e3:.2f})"
                        for p in result["prefill"])
    print(f"decode {result['decode_step_s']['median'] * 1e3:.3f} ms/token (median of {result['decode_step_s']['n']}), TTFT {prefill}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
