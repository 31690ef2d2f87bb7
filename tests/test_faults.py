"""Faults the real server survives, each provoked for real: an engine file corrupted or deleted
after start-up, SIGKILL in the middle of a stream, SIGTERM during a burst. (Slow clients are in
test_serve.py, beside the other limits.)"""
from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from contract.manifest import Manifest, engines_path

from .servers import MODEL, Server, audio_part, image_part, png_url, user, wait_for, wav_b64

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def engines_copy(tiny_engines_dir, tmp_path) -> Path:
    """An engines root whose tiny/onnx files are symlinks to the shared export: a test replaces or
    deletes the links, never the files behind them."""
    directory = engines_path(tmp_path / "engines", "tiny", "onnx")
    directory.mkdir(parents=True)
    for f in tiny_engines_dir.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (directory / f.name).symlink_to(f)
    return tmp_path / "engines"


def test_an_engine_file_corrupted_or_deleted_after_start_up_degrades_only_its_paths(engines_copy, tmp_path):
    """With offloading, the encoders load on first use: that load verifies the file against the manifest."""
    directory = engines_path(engines_copy, "tiny", "onnx")
    manifest = Manifest.load(directory)
    vision, audio = (directory / manifest.engines[name].files[0].name for name in ("vision", "audio"))
    expected = {name: manifest.engines[name].files[0].sha256 for name in ("vision", "audio")}
    s = Server(engines_copy, tmp_path / "serve.log", "runtime.offload.enabled=true", "runtime.policy.force_exit=6")
    try:
        assert s.post(HI).status_code == 200
        original = vision.read_bytes()
        vision.unlink()
        vision.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit
        found = hashlib.sha256(vision.read_bytes()).hexdigest()
        audio.unlink()

        image = s.post({**HI, "messages": user("what is this?", image_part(png_url()))})
        assert image.status_code == 503, image.text
        error = image.json()["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert f"{vision} has sha256 {found}, manifest expects {expected['vision']}" in error["message"]
        sound = s.post({**HI, "messages": user("listen", audio_part(wav_b64(0.3)))})
        assert sound.status_code == 503 and f"{audio} is missing (manifest expects sha256 {expected['audio']})" in sound.json()["error"]["message"]

        health = httpx.get(f"{s.url}/health").json()
        dynamic = {p.name for p in manifest.paths if not p.static}
        assert health["status"] == "degraded"
        assert set(health["degraded_paths"]) == {p for p in dynamic if "image" in p or "audio" in p}
        assert all(str(vision) in why for p, why in health["degraded_paths"].items() if "image" in p)
        assert s.post(HI).status_code == 200  # the text paths keep serving
        assert s.post({**HI, "messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 3}).status_code == 200

        vision.unlink()
        vision.write_bytes(original)  # put back: the next load verifies it again and the paths recover
        assert s.post({**HI, "messages": user("what is this?", image_part(png_url()))}).status_code == 200
        health = httpx.get(f"{s.url}/health").json()
        assert set(health["degraded_paths"]) == {p for p in dynamic if "audio" in p}
        assert "generation failed" in s.logs() and "Traceback" in s.logs()  # the operator gets the whole story
    finally:
        s.stop()


def test_sigkill_mid_stream_then_a_restart_serves_with_no_clean_up(engines_copy, tmp_path):
    directory = engines_path(engines_copy, "tiny", "onnx")
    before = sorted(p.name for p in directory.iterdir())
    s = Server(engines_copy, tmp_path / "first.log")
    body = {**HI, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGKILL)
            assert s.proc.wait(timeout=10) == -signal.SIGKILL
            with pytest.raises(httpx.HTTPError):  # the stream breaks off: no [DONE]
                for line in lines:
                    assert line != "data: [DONE]"
    finally:
        s.stop()
    again = Server(engines_copy, tmp_path / "second.log", port=s.port)  # the same port, at once
    try:
        with httpx.stream("POST", f"{again.url}/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=30) as r:
            data = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{again.url}/health").json() == {"status": "ok"}
    finally:
        again.stop()
    assert sorted(p.name for p in directory.iterdir()) == before  # nothing left behind, nothing to remove


def test_sigterm_during_a_burst_finishes_it_and_refuses_new_requests(tiny_engines_dir, tmp_path):
    s = Server(tiny_engines_dir.parent.parent, tmp_path / "serve.log", "runtime.max_batch_size=4")
    streams: list[list[str]] = [[] for _ in range(6)]  # four generating, two queued
    body = {**HI, "max_tokens": 120, "ignore_eos": True, "stream": True}

    def stream(lines: list[str]) -> None:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=120) as r:
            lines.extend(line for line in r.iter_lines() if line.startswith("data: "))

    threads = [threading.Thread(target=stream, args=(lines,)) for lines in streams]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: s.metric("dyngraph_running_requests") == 4 and s.metric("dyngraph_queue_depth") == 2, timeout=30)
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{s.url}/health").status_code == 503)
        refused = s.post(HI)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"]
        for t in threads:
            t.join(timeout=120)
        for lines in streams:  # every request admitted before the signal, queued ones included, finished whole
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
            assert len(lines) == 1 + 120 + 1 + 1  # role chunk, a chunk per token, the finish chunk, [DONE]
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
