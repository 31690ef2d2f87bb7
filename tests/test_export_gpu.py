"""The export, the engine chain and captured decode steps on a CUDA GPU with ONNX Runtime's CUDA provider (fp16):
GroupQueryAttention has no fp32 CUDA kernel, so these engines are exported on the GPU."""
from __future__ import annotations

import threading

import pytest
import torch
from rich.console import Console

from .conftest import compose_export

cuda_provider = False
try:
    import onnxruntime

    cuda_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
except ImportError:
    pass

pytestmark = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_provider),
                                  reason="needs a CUDA GPU and onnxruntime's CUDA provider")


@pytest.fixture(scope="module")
def cuda_export(tmp_path_factory):
    from pipeline.export import run_export

    app = compose_export(["model=tiny", "export.dtype=fp16", "export.device=cuda", "export.progress=false"])
    return run_export(app.model, app.export, tmp_path_factory.mktemp("cuda-engines"), console=Console(stderr=True, quiet=True))


@requires_gpu
def test_fp16_export_validates_on_cuda(cuda_export):
    engines = cuda_export.manifest.engines
    assert cuda_export.manifest.dtype == "fp16" and len(engines) == 16
    assert max(e.max_rel_error for e in engines.values()) <= 2e-2


def stepper_on_cuda(directory, graphs: bool, max_batch: int = 4):
    from contract.manifest import Manifest
    from runtime.engines import EngineSet
    from runtime.step import Stepper, captured_engines

    engines = EngineSet(directory, placement=lambda e: "cuda:0", cuda_graphs=captured_engines(Manifest.load(directory)) if graphs else ())
    return Stepper(engines, max_batch=max_batch, capacity=128, cuda_graphs=graphs)


@requires_gpu
@pytest.mark.parametrize("exit_layer, modalities", [(6, ["text"]), (12, ["text", "image"]), (24, ["text", "image", "audio"])])
def test_chain_on_cuda_matches_eager(cuda_export, exit_layer, modalities):
    from model.autoglm import build_model

    stepper = stepper_on_cuda(cuda_export.directory, graphs=False)
    model = build_model(compose_export(["model=tiny"]).model, "cuda", torch.float16)  # same seed, same CUDA generator
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 512, (1, 9), device="cuda", generator=g)
    pixels = torch.randn(1, 3, 224, 224, device="cuda", generator=g, dtype=torch.float16) if "image" in modalities else None
    mel = torch.randn(1, 80, 32, device="cuda", generator=g, dtype=torch.float16) if "audio" in modalities else None
    media = stepper.encode(pixels, mel, static=False) if len(modalities) > 1 else None
    with torch.inference_mode():
        got, _ = stepper.prefill("a", prompt[0].tolist(), [6, 12, 18, 24].index(exit_layer) + 1, media)
        eager_media, mask = model.encode_media(pixels, mel)
        want = model(prompt, exit_layer, eager_media, mask)[:, -1]
    assert got.device.type == "cuda"
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"


@requires_gpu
def test_captured_decode_steps_replay_the_uncaptured_ones(cuda_export):
    """Greedy tokens of three sequences on different depths, 16 steps, with and without CUDA graphs
    (the captured run pads three rows to the batch-4 bucket); one leaves half-way."""
    from runtime.step import Row

    tokens = {}
    for graphs in (False, True):
        stepper = stepper_on_cuda(cuda_export.directory, graphs)
        with torch.inference_mode():
            stepper.capture()
            rows = {}
            for key, depth, prompt in (("a", 1, [5, 6, 7]), ("b", 4, [9, 8, 7, 6, 5]), ("c", 2, [3])):
                logits, _ = stepper.prefill(key, prompt, depth, None)
                rows[key] = Row(key, depth, int(logits.argmax()))
            out = {k: [] for k in rows}
            for step in range(16):
                if step == 8:
                    stepper.release("c")
                    del rows["c"]
                keys, logits = stepper.decode(list(rows.values()))
                for key, token in zip(keys, logits.argmax(-1).tolist()):
                    rows[key].token = token
                    out[key].append(token)
        tokens[graphs] = out
    assert tokens[True] == tokens[False]


@requires_gpu
def test_an_evicted_segment_recaptures_its_graphs_on_reload(cuda_export):
    """A segment evicted mid-generation comes back (from pinned host memory) as a new session that
    captures its own graphs: the tokens equal the uncaptured run's, and the old graphs went with the old session."""
    from contract.manifest import Manifest
    from exporters.ort import CAPTURE_RUNS
    from runtime.engines import EngineSet
    from runtime.step import Row, Stepper, captured_engines

    tokens = {}
    for graphs in (False, True):
        engines = EngineSet(cuda_export.directory, placement=lambda e: "cuda:0", host_copy=lambda device: True,
                            cuda_graphs=captured_engines(Manifest.load(cuda_export.directory)) if graphs else ())
        stepper = Stepper(engines, max_batch=4, capacity=128, cuda_graphs=graphs)
        with torch.inference_mode():
            stepper.capture()
            logits, _ = stepper.prefill("a", [9, 8, 7, 6, 5], 4, None)
            row, out = Row("a", 4, int(logits.argmax())), []
            for step in range(12):
                if step == 6:
                    old = engines.session("segment.3")
                    engines.unload("segment.3", "budget")
                _, logits = stepper.decode([row])
                row.token = int(logits.argmax())
                out.append(row.token)
            torch.cuda.synchronize()
        new = engines.session("segment.3")
        assert new is not old and engines.loads["segment.3"][0] == 2
        if graphs:
            assert len(new.graphs) >= 1 and new.graph_runs[threading.get_ident(), 1] == CAPTURE_RUNS  # captured anew, under the load lock
        tokens[graphs] = out
    assert tokens[True] == tokens[False]


@requires_gpu
@pytest.mark.parametrize("draft_depth, k", [(1, 4), (2, 3)])
def test_speculation_over_captured_steps_gives_the_plain_tokens(cuda_export, draft_depth, k):
    """A drafting sequence beside a plain one, captured decode steps (the plain row runs the deep
    segments the drafting one is carried through), verifications in fp16 on CUDA: both sequences'
    tokens are the plain captured run's."""
    from runtime.sampling import GREEDY, Sampler
    from runtime.speculation import Draft, accept
    from runtime.step import Row

    prompts = {"a": [9, 8, 7, 6, 5], "b": [3, 4, 5]}
    n = 20

    def started() -> tuple:
        """A captured stepper with each prompt prefilled to full depth: (stepper, rows, each sequence's tokens so far)."""
        stepper = stepper_on_cuda(cuda_export.directory, graphs=True)
        stepper.capture()
        rows, tokens = {}, {}
        for key, prompt in prompts.items():
            logits, _ = stepper.prefill(key, prompt, 4, None)
            rows[key] = Row(key, 4, int(logits.argmax()))
            tokens[key] = [rows[key].token]
        return stepper, rows, tokens

    with torch.inference_mode():
        stepper, rows, want = started()
        for _ in range(n):
            keys, logits = stepper.decode(list(rows.values()))
            for key, token in zip(keys, logits.argmax(-1).tolist()):
                rows[key].token = token
                want[key].append(token)

    sampler = Sampler(512)
    with torch.inference_mode():
        stepper, rows, got = started()
        draft = Draft(draft_depth, k, k, False)
        while len(got["a"]) <= n:
            rows["a"].draft = draft_depth
            keys, logits = stepper.decode(list(rows.values()))
            tokens = dict(zip(keys, logits.argmax(-1).tolist()))
            rows["b"].token = tokens["b"]
            got["b"].append(tokens["b"])
            draft.add(tokens["a"], None)
            rows["a"].token = tokens["a"]
            if len(draft.tokens) == k:
                past = len(prompts["a"]) + len(got["a"]) - 1
                out, accepted = accept(draft, stepper.verify(rows["a"], past, [got["a"][-1], *draft.tokens[:-1]]), GREEDY, None, sampler)
                draft.settle(accepted, len(out))
                got["a"] += out
                rows["a"].token = out[-1]
                stepper.truncate("a", past + len(out))
    assert got["a"][:n + 1] == want["a"][:n + 1]
    assert got["b"][:len(want["b"])] == want["b"][:len(got["b"])]
