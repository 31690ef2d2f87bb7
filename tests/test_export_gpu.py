"""The export and the engine chain on a CUDA GPU with ONNX Runtime's CUDA provider (fp16)."""
from __future__ import annotations

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
    assert cuda_export.manifest.dtype == "fp16" and len(engines) == 18
    assert max(e.max_rel_error for e in engines.values()) <= 2e-2


@requires_gpu
@pytest.mark.parametrize("exit_layer, modalities", [(6, ["text"]), (12, ["text", "image"]), (24, ["text", "image", "audio"])])
def test_chain_on_cuda_matches_eager(cuda_export, exit_layer, modalities):
    from model.autoglm import build_model
    from runtime.chain import PathRunner
    from runtime.engines import EngineSet

    engines = EngineSet(cuda_export.directory, placement=lambda e: "cuda:0")
    model = build_model(compose_export(["model=tiny"]).model, "cuda", torch.float16)  # same seed, same CUDA generator
    runner = PathRunner(engines, engines.manifest.path(exit_layer, modalities))
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 512, (1, 9), device="cuda", generator=g)
    pixels = torch.randn(1, 3, 224, 224, device="cuda", generator=g, dtype=torch.float16) if "image" in modalities else None
    mel = torch.randn(1, 80, 32, device="cuda", generator=g, dtype=torch.float16) if "audio" in modalities else None
    state = runner.empty_state(1, runner.encode(pixels, mel))
    got = runner.step(state, prompt)
    with torch.inference_mode():
        media, mask = model.encode_media(pixels, mel)
        want = model(prompt, exit_layer, media, mask)[:, -1]
    assert got.device.type == "cuda"
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"
