"""`python -m pipeline export` on the tiny model: engines, validation, path chaining, cache,
crash safety, concurrency and bad input, all through the real exporter."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.autoglm import meta_model
from contract.engines import Limits, engine_specs, path_specs
from contract.manifest import Manifest, engines_path
from model.files import sha256_file
from pipeline.export import human_parameters
from runtime.engines import EngineSet
from runtime.step import Row, Stepper

from .conftest import ROOT, free_port, run_cli

EXITS = [6, 12, 18, 24]
TOLERANCE = 1e-4  # fp32


def assert_consistent(directory: Path) -> Manifest:
    """The manifest loads and every file it names is complete."""
    manifest = Manifest.load(directory)
    for engine in manifest.engines.values():
        for f in engine.files:
            assert sha256_file(directory / f.name) == f.sha256, f"{f.name} does not match the manifest"
    return manifest


def copy_export(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the shared export for tests that change it: (engines_dir, model dir)."""
    root = tmp_path / "engines"
    shutil.copytree(src, engines_path(root, "tiny", "onnx"), ignore=shutil.ignore_patterns(".lock"))
    return root, engines_path(root, "tiny", "onnx")


# --- the export itself ------------------------------------------------------------------------


def test_every_path_and_engine_is_validated(tiny_export):
    manifest = assert_consistent(tiny_export.directory)
    dynamic = [p for p in manifest.paths if not p.static]
    assert len(dynamic) == 16
    assert {(p.exit_layer, tuple(p.modalities)) for p in dynamic} == {
        (e, m) for e in EXITS for m in [("text",), ("text", "image"), ("text", "audio"), ("text", "image", "audio")]}
    # the static graph is every engine: both encoders, every cross-attention block, all 24 layers
    assert manifest.static_path.encode == ["vision", "audio", "cross_kv.0", "cross_kv.1", "cross_kv.2", "cross_kv.3"]
    assert manifest.static_path.step == ["embed", *(f"{e}.{k}" for k in range(4) for e in ("cross_attn", "segment")), "lm_head"]
    for path in manifest.paths:
        for name in path.encode + path.step:
            assert name in manifest.engines
    for engine in manifest.engines.values():
        assert len(engine.validation) >= 2, engine.name
        shapes = {json.dumps(v["sizes"], sort_keys=True) for v in engine.validation}
        assert len(shapes) == len(engine.validation), f"{engine.name} validated twice at one shape"
        assert engine.max_rel_error <= TOLERANCE, engine.name
    assert manifest.model["parameters"] > 1_000_000
    assert manifest.backend["versions"]["onnxruntime"]


def test_text_only_paths_run_no_media_engine(tiny_export):
    for path in tiny_export.manifest.paths:
        if path.modalities == ["text"]:
            assert not path.encode
            assert not any(n.startswith(("cross_", "vision", "audio")) for n in path.step)


def test_no_weight_is_stored_in_two_dynamic_engines(tiny_config):
    specs = engine_specs(meta_model(tiny_config), Limits())
    owner: dict[int, str] = {}
    for spec in specs:
        for p in spec.module.parameters():
            assert id(p) not in owner, f"a weight is in both {owner[id(p)]} and {spec.name}"
            owner[id(p)] = spec.name
    model = meta_model(tiny_config)
    assert len(owner) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def engines(tiny_engines_dir):
    return EngineSet(tiny_engines_dir)


@pytest.fixture
def stepper(engines):
    return Stepper(engines, max_batch=4, capacity=64, cuda_graphs=False)


def media_inputs(modalities, generator):
    pixels = torch.randn(1, 3, 224, 224, generator=generator) if "image" in modalities else None
    mel = torch.randn(1, 80, 24, generator=generator) if "audio" in modalities else None
    return pixels, mel


@pytest.mark.parametrize("path_name", [p.name for p in path_specs(EXITS)])
def test_chained_engines_match_the_eager_model(path_name, stepper, tiny_model):
    path = next(p for p in stepper.manifest.paths if p.name == path_name)
    generator = torch.Generator().manual_seed(len(path_name))
    prompt = torch.randint(0, tiny_model.cfg.text.vocab_size, (1, 7), generator=generator)
    # the static path carries every encoder; check it with an image, padding audio the way it does
    modalities = ("text", "image") if path.static else tuple(path.modalities)
    pixels, mel = media_inputs(modalities, generator)
    depth = EXITS.index(path.exit_layer) + 1
    media = stepper.encode(pixels, mel, path.static) if len(modalities) > 1 or path.static else None

    first, _ = stepper.prefill("a", prompt[0].tolist(), depth, media)
    with torch.inference_mode():
        eager_media, media_mask = tiny_model.encode_media(pixels, mel)
        expected = tiny_model(prompt, path.exit_layer, eager_media, media_mask)[:, -1]
    torch.testing.assert_close(first, expected, rtol=TOLERANCE, atol=TOLERANCE)

    # one decode step through the cache rows the prefill filled
    token = first.argmax(-1, keepdim=True)
    keys, second = stepper.decode([Row("a", depth, int(token), media)])
    with torch.inference_mode():
        expected = tiny_model(torch.cat([prompt, token], 1), path.exit_layer, eager_media, media_mask)[:, -1]
    assert keys == ["a"]
    torch.testing.assert_close(second, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_static_text_only_equals_full_depth_dynamic(stepper):
    """Placeholder media are masked, so the static graph answers as the text-only full path does."""
    prompt = [5, 17, 99, 3]
    a, _ = stepper.prefill("static", prompt, 4, stepper.encode(None, None, static=True))
    b, _ = stepper.prefill("dynamic", prompt, 4, None)
    torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)


def test_a_decode_step_writes_one_entry_per_layer_and_nothing_else(stepper):
    """Each sequence's new keys and values land right after its own entries, in its own rows; the
    rest of every buffer (other positions, spare rows) stays as it was."""
    stepper.prefill("long", list(range(1, 12)), 4, None)
    stepper.prefill("short", [7, 8, 9], 1, None)
    before = [c.buffer.clone() for c in stepper.caches]
    stepper.decode([Row("long", 4, 3), Row("short", 1, 4)])
    for k, (cache, old) in enumerate(zip(stepper.caches, before)):
        changed = (cache.buffer != old).any(dim=(2, 4))  # [L * 2, rows, capacity]
        expected = torch.zeros_like(changed)
        for key, length in (("long", 11), ("short", 3)):
            if key in cache.members:
                expected[:, cache.row(key), length] = True
        assert torch.equal(changed, expected), f"segment {k}"
        assert cache.lengths[:len(cache.members)].tolist() == [12, 4][:len(cache.members)]


def test_a_departing_sequence_leaves_the_rows_contiguous(stepper):
    for key, prompt in (("a", [1, 2, 3]), ("b", [4, 5]), ("c", [6, 7, 8, 9])):
        stepper.prefill(key, prompt, 2, None)
    c_rows = [cache.buffer[:, cache.row("c")].clone() for cache in stepper.caches[:2]]
    stepper.release("a")
    for cache, rows in zip(stepper.caches[:2], c_rows):
        assert cache.members == ["c", "b"]  # the last row moved into the hole
        assert torch.equal(cache.buffer[:, 0], rows) and cache.lengths[:2].tolist() == [4, 2]
    _, logits = stepper.decode([Row("b", 2, 1), Row("c", 2, 1)])
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()


# --- cache, crash safety, concurrency ---------------------------------------------------------


def test_second_export_rebuilds_nothing(tiny_export, engines_root):
    result = run_cli("pipeline", "export", f"engines_dir={engines_root}", "export.progress=false")
    assert result.returncode == 0, result.stderr
    assert "0 built, 16 cached" in result.stderr


def test_printed_lines_are_whole_when_not_on_a_terminal(tiny_export, engines_root, tmp_path):
    """Into a pipe (a CI log) rich would wrap at 80 columns: a path it prints must stay one line to copy."""
    long = tmp_path / ("a-folder-with-a-long-name-" * 4)
    long.symlink_to(engines_root, target_is_directory=True)
    result = run_cli("pipeline", "export", f"engines_dir={long}", "export.progress=false")
    assert result.returncode == 0, result.stderr
    lines = [line.rstrip() for line in result.stderr.splitlines()]
    assert f"engines in {engines_path(long, 'tiny', 'onnx')}" in lines
    n = tiny_export.manifest.model["parameters"]
    assert lines[0].startswith(f"tiny: {human_parameters(n)} parameters ({n:,}); 16 engines")


def test_parameter_counts_in_millions_or_billions():
    assert human_parameters(4_685_064) == "4.69 M"
    assert human_parameters(20_800) == "0.02 M"
    assert human_parameters(9_062_341_120) == "9.06 B"


def test_one_change_rebuilds_only_what_it_touches(tiny_export, tmp_path):
    root, directory = copy_export(tiny_export.directory, tmp_path)
    before = Manifest.load(directory)
    result = run_cli("pipeline", "export", f"engines_dir={root}", "export.progress=false", "model.vision.n_layers=1")
    assert result.returncode == 0, result.stderr
    after = assert_consistent(directory)
    changed = {n for n in after.engines if after.engines[n].key != before.engines[n].key}
    assert changed == {"vision"}
    assert "1 built, 15 cached" in result.stderr


def start_export(root: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "export", f"engines_dir={root}", "export.progress=false", *overrides],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_export_leaves_a_consistent_directory(tiny_export, tmp_path):
    root, directory = copy_export(tiny_export.directory, tmp_path)
    before = Manifest.load(directory)
    change = ("model.vision.n_layers=3", "model.audio.n_layers=1")  # vision is built first, then audio
    # killed while an engine file is half-way in staging
    proc = start_export(root, *change)
    wait_for(lambda: any(directory.glob(".tmp-*/*.onnx")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert assert_consistent(directory).engines["vision"].key == before.engines["vision"].key

    # killed after the vision engine was committed, before the audio encoder and the manifest
    proc = start_export(root, *change)
    wait_for(lambda: any(f.name.startswith("vision-") and f.suffix == ".json" and f.name != f"vision-{before.engines['vision'].key}.json"
                         for f in directory.iterdir()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert assert_consistent(directory).to_json() == before.to_json()

    # the next export finishes the job, reusing the committed vision engine, and sweeps the staging
    result = run_cli("pipeline", "export", f"engines_dir={root}", "export.progress=false", *change)
    assert result.returncode == 0, result.stderr
    assert "1 built, 15 cached" in result.stderr
    assert_consistent(directory)
    assert not list(directory.glob(".tmp-*"))


def test_concurrent_exports_queue_instead_of_colliding(tiny_export, tmp_path):
    root, directory = copy_export(tiny_export.directory, tmp_path)
    procs = [start_export(root, "model.vision.n_layers=3") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    stderr = [err for _, err in outputs]
    assert sum("waiting for another export" in err for err in stderr) == 1
    assert sum("1 built" in err for err in stderr) == 1 and sum("0 built" in err for err in stderr) == 1
    assert_consistent(directory)


# --- bad input: one line, non-zero exit, nothing written ---------------------------------------


def write_bad_checkpoint(directory: Path) -> None:
    """A GLM checkpoint whose config matches tiny but with one tensor of the wrong shape."""
    directory.mkdir()
    config = {"model_type": "glm", "hidden_size": 128, "num_hidden_layers": 24, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "intermediate_size": 256,
              "attention_bias": True, "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64)}, directory / "model.safetensors")


@pytest.mark.parametrize("overrides, message", [
    (["model=nope"], "model=nope is not an option: model is one of phone-9b, reference, reference-cpu, tiny"),
    (["export.backend=nope"], "unknown export backend 'nope'"),
    (["export.dtype=fp8"], "export.dtype='fp8'"),
    (["model.text.exit_layers=[5,11,18,23]"], "exit_layers=[5, 11, 18, 23]"),
    (["model.checkpoint=/nonexistent/glm"], "/nonexistent/glm"),
    (["model.checkpoint={ckpt}"], "model.embed_tokens.weight"),
    (["engines_dir={file}/engines"], "is not a directory"),
])
def test_bad_input_fails_cleanly(overrides, message, tmp_path):
    (tmp_path / "a-file").write_text("")
    write_bad_checkpoint(tmp_path / "ckpt")
    target = tmp_path / "engines"
    args = [o.format(ckpt=tmp_path / "ckpt", file=tmp_path / "a-file") for o in overrides]
    if not any(a.startswith("engines_dir=") for a in args):
        args.append(f"engines_dir={target}")
    result = run_cli("pipeline", "export", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert not target.exists(), "a failed export wrote files"


def test_without_onnxruntime_the_export_and_the_server_name_the_extra(tiny_export, engines_root, tmp_path):
    """onnxruntime is an extra (.[cpu] or .[gpu]): an install without it gets one line saying which, not a traceback."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    env = {"PYTHONPATH": str(shadow)}
    for result in (run_cli("pipeline", "export", f"engines_dir={tmp_path / 'engines'}", env=env),
                   run_cli("runtime.serve", f"engines_dir={engines_root}", f"server.port={free_port()}", env=env)):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "the onnx backend needs onnxruntime" in result.stderr and ".[cpu]" in result.stderr, result.stderr
    assert not (tmp_path / "engines").exists()
