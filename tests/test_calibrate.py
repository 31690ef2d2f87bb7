"""`python -m pipeline calibrate` on tiny models: the exit heads it trains, the thresholds it
chooses, the exits file through export and serve, bad input, and the bench's quality column."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model.autoglm import build_model
from model.exits import EXITS_NAME, ExitsError, read_exits, resolve_exits
from model.tokenizer import ChatTokenizer
from calibrate.metrics import agreement_curve, choose_threshold, fit_heuristic
from calibrate.plots import agreement_title
from contract.manifest import Manifest
from bench.quality import agreement, quality_block, token_texts
from runtime.config import PolicyConfig
from runtime.policy import DepthPolicy

from .conftest import run_cli
from .test_checkpoint import random_hf_model, tiny_config
from .test_export import copy_export, write_bad_checkpoint

TOK = ChatTokenizer.builtin()
EXITS = [6, 12, 18, 24]
RANK = 8
TARGET = 0.95
# the margins the calibrated heads must beat the fresh ones by, on held-out text
KL_RATIO = 0.7  # held-out KL(full depth || exit) falls by at least 30% at every exit
AGREEMENT_GAIN = 0.10  # top-1 agreement with full depth rises by at least 10 points at every exit
FRESH_SLACK = 0.05  # on text calibration never saw, an exit's agreement above its threshold stays within 5 points of the target

APPS = ["WeChat", "the camera", "Alipay", "the calendar", "Settings", "the gallery", "Maps", "the music player"]
ACTIONS = ["open", "close", "search", "scroll through", "share a photo from", "turn off notifications of", "update", "clear the cache of"]
REPLIES = ["First I {a} {app}.", "Then I tap the button at the top.", "I wait {n} seconds for it to load.", "好的, 我来帮你打开{app}.",
           "The screen shows {n} new messages.", "I go back to the home screen.", "Done: {app} is ready.", "请稍等, 正在处理."]


def chat(rng: random.Random) -> dict:
    app, action = rng.choice(APPS), rng.choice(ACTIONS)
    question = rng.choice([f"Please {action} {app}.", f"Can you {action} {app}?", f"帮我{action} {app}", f"Why can't I {action} {app}? Explain."])
    reply = " ".join(rng.choice(REPLIES).format(a=action, app=app, n=rng.randint(1, 9)) for _ in range(rng.randint(3, 8)))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def write_corpus(directory: Path, seed: int, chats: int, notes: int) -> Path:
    """A phone-agent corpus from fixed templates: .jsonl chats and .txt notes, English and Chinese."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    (directory / "chats.jsonl").write_text("\n".join(json.dumps(chat(rng), ensure_ascii=False) for _ in range(chats)) + "\n")
    for i in range(notes):
        text = " ".join(rng.choice(REPLIES).format(a=rng.choice(ACTIONS), app=rng.choice(APPS), n=rng.randint(1, 9)) for _ in range(60))
        (directory / f"note-{i}.txt").write_text(text + "\n")
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", seed=0, chats=300, notes=12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny GLM checkpoint shaped like a trained one in the two ways that matter here: later
    layers refine rather than rewrite the residual stream (their output projections are damped),
    and the final norm has a per-channel scale that the fresh exit norms do not know."""
    directory = tmp_path_factory.mktemp("glm")
    hf = random_hf_model(tiny_config())
    with torch.no_grad():
        for layer in hf.model.layers[6:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
        hf.model.norm.weight.copy_(torch.exp(0.5 * torch.randn(hf.model.norm.weight.shape, generator=torch.Generator().manual_seed(1))))
    hf.save_pretrained(directory, safe_serialization=True)
    TOK.tokenizer.save(str(directory / "tokenizer.json"))  # as a real checkpoint ships one; the server reads it from there
    return directory


def calibrate(*overrides: str, timeout: float = 300):
    return run_cli("pipeline", "calibrate", "calibrate.progress=false", "bench=ci", *overrides, timeout=timeout)


@pytest.fixture(scope="module")
def calibrated(checkpoint, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibration") / "exits"
    result = calibrate(f"model.checkpoint={checkpoint}", f"model.text.exit_adapter_rank={RANK}", f"calibrate.corpus={corpus}",
                       f"calibrate.output_dir={out}", "calibrate.seq_len=128", "calibrate.max_train_tokens=20000",
                       "calibrate.max_heldout_tokens=10000", "calibrate.batch_tokens=512", "calibrate.max_steps=150", "calibrate.lr=0.02")
    assert result.returncode == 0, result.stderr[-3000:]
    # the export command it prints, whole on one line (not on a terminal rich would wrap it at 80 columns)
    assert any(f"export with: python -m pipeline export model=tiny model.exits={out / EXITS_NAME} model.text.exit_adapter_rank={RANK};" in line
               for line in result.stderr.splitlines()), result.stderr[-3000:]
    return out


# --- the calibration itself ------------------------------------------------------------------


def test_calibration_lowers_kl_and_raises_agreement(calibrated):
    report = json.loads((calibrated / "report.json").read_text())
    assert [e["exit_layer"] for e in report["exits"]] == EXITS[:-1]
    for e in report["exits"]:
        before, after = e["heldout"]["before"], e["heldout"]["after"]
        assert after["kl"] <= KL_RATIO * before["kl"], e
        assert after["agreement"] >= before["agreement"] + AGREEMENT_GAIN, e
    assert report["corpus"]["train_tokens"] == 20000 and report["corpus"]["heldout_tokens"] == 10000
    assert report["training"]["steps"] == 150
    assert {"exits.safetensors", "exits.sha256", "report.json", "report.md", "agreement.png", "training.png"} == {p.name for p in calibrated.iterdir()}
    digest = hashlib.sha256((calibrated / EXITS_NAME).read_bytes()).hexdigest()
    assert (calibrated / "exits.sha256").read_text() == f"{digest}  {EXITS_NAME}\n" and report["file"]["sha256"] == digest
    with safe_open(str(calibrated / EXITS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"text.segments.{k}.{n}" for k in range(3)
                                          for n in ("exit_norm.weight", "exit_adapter.down.weight", "exit_adapter.up.weight"))
        assert f.get_slice("text.segments.0.exit_adapter.down.weight").get_shape() == [RANK, 128]
        assert f.get_tensor("text.segments.0.exit_adapter.up.weight").abs().max() > 0  # trained away from the identity
    md = (calibrated / "report.md").read_text()
    assert "| exit | KL before | KL after |" in md and "![agreement.png](agreement.png)" in md
    assert "runtime.policy.thresholds=[" in md  # the heuristic fitted to the held-out chats


def test_thresholds_meet_the_target(calibrated, checkpoint, tmp_path, one_torch_thread):
    """On the held-out split the thresholds were chosen on, and on text calibration never saw,
    run through the model with the exits file loaded (model.exits)."""
    info, _ = read_exits(calibrated / EXITS_NAME)
    report = json.loads((calibrated / "report.json").read_text())
    chosen = {e["exit_layer"]: e for e in report["exits"]}
    assert {k: v for k, v in info.thresholds.items()} == {k: chosen[k]["threshold"] for k in EXITS[:-1]}
    assert sum(t is not None for t in info.thresholds.values()) >= 2, info.thresholds  # else this test shows nothing
    for layer, t in info.thresholds.items():
        if t is not None:
            assert chosen[layer]["at_threshold"]["agreement"] >= TARGET

    cfg = tiny_config(checkpoint=str(checkpoint), exits=str(calibrated / EXITS_NAME))
    cfg.text.exit_adapter_rank = RANK
    model = build_model(cfg)
    fresh = write_corpus(tmp_path / "fresh", seed=1, chats=100, notes=0)
    rows = [TOK.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=False)[:128]
            for line in (fresh / "chats.jsonl").read_text().splitlines()]
    conf = {e: [] for e in EXITS[:-1]}
    agree = {e: [] for e in EXITS[:-1]}
    text = model.text
    with torch.no_grad():
        for ids in rows:  # one pass through the segments, each exit's head on the way, as the dynamic graph runs them
            h, probs = text.embed_tokens(torch.tensor([ids])), []
            positions, no_cache = torch.arange(len(ids))[None], torch.zeros(1, 0, dtype=torch.bool)
            for segment in text.segments:
                h, _ = segment(h, positions, no_cache, segment.empty_kv(1))
                probs.append(torch.softmax(text.lm_head(segment.exit(h))[0, :, :TOK.vocab_size], -1))
            full = probs[-1].argmax(-1)
            for e, p in zip(EXITS[:-1], probs):
                conf[e].append(p.max(-1).values)
                agree[e].append(p.argmax(-1) == full)
    for e, t in info.thresholds.items():
        if t is None:
            continue
        c, a = torch.cat(conf[e]), torch.cat(agree[e])
        exiting = c >= t
        assert exiting.sum() >= 20, (e, int(exiting.sum()))
        assert float(a[exiting].float().mean()) >= TARGET - FRESH_SLACK, (e, t, float(a[exiting].float().mean()))


def test_threshold_choice_is_the_lowest_that_holds_from_the_top():
    # confidences 1.0 .. 0.01; the 30 most confident agree, then agreement falls off
    conf = np.linspace(1.0, 0.01, 100)
    agree = np.array([True] * 30 + [True, False] * 10 + [False] * 50)
    curve = agreement_curve(conf, agree)
    t = choose_threshold(*curve, target=0.95, min_rate=0.0)
    rates, agreements = curve[1], curve[2]
    assert t == pytest.approx(conf[32])  # 33 exit, 32 agree: 97.0%; at 34, 32/34 = 94.1%
    assert choose_threshold(*curve, target=1.0, min_rate=0.0) == pytest.approx(conf[30])
    assert rates[-1] == 1.0 and agreements[-1] == pytest.approx(0.40)
    # a disagreeing top position sinks every threshold, unless thresholds that few reach are not tested
    agree[0] = False
    curve = agreement_curve(conf, agree)
    assert choose_threshold(*curve, target=0.95, min_rate=0.0) is None
    assert choose_threshold(*curve, target=0.95, min_rate=0.2) == pytest.approx(conf[30])  # 20..31 exit: >= 19/20


def test_agreement_plot_promises_dots_only_when_it_draws_them():
    report = {"model": {"name": "tiny"}, "exits": [{"exit_layer": 6, "threshold": None}, {"exit_layer": 12, "threshold": None}]}
    assert agreement_title(report) == "tiny: held-out agreement per exit (no exit reaches the target: no threshold chosen)"
    report["exits"][1]["threshold"] = 0.8
    assert agreement_title(report) == "tiny: held-out agreement per exit (dots: the chosen thresholds)"


def test_heuristic_fit():
    scores = np.array([0.05, 0.1, 0.15, 0.3, 0.35, 0.5, 0.7, 0.9])
    # columns: reply agreement at exits 6, 12, 18; short requests agree early, long ones only late
    agreement = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 1.0, 1.0], [0.2, 1.0, 1.0],
                          [0.1, 0.5, 1.0], [0.1, 0.2, 1.0], [0.0, 0.1, 0.5], [0.0, 0.0, 0.2]])
    thresholds, groups = fit_heuristic(scores, agreement, np.ones(8), target=0.95)
    assert thresholds == [0.15, 0.35, 0.7]  # score < 0.15 exits at 6, < 0.35 at 12, < 0.7 at 18
    assert [g["requests"] for g in groups] == [2, 2, 2]
    DepthPolicy(PolicyConfig(thresholds=thresholds), EXITS)  # a valid runtime.policy.thresholds


# --- the exits file through export and serve -------------------------------------------------


def test_confidence_policy_reads_the_manifests_thresholds():
    exits = {"thresholds": {"6": 0.8, "12": None, "18": 0.3}}
    policy = DepthPolicy(PolicyConfig(name="confidence"), EXITS, exits)
    assert [policy.confident(0.5, e) for e in (6, 12, 18)] == [False, False, True]
    assert policy.confident(0.85, 6) and not policy.confident(1.0, 12)  # null: that exit is never taken
    fallback = DepthPolicy(PolicyConfig(name="confidence", confidence=0.4), EXITS, exits)  # a number overrides them
    assert [fallback.confident(0.5, e) for e in (6, 12, 18)] == [True, True, True]
    uncalibrated = DepthPolicy(PolicyConfig(name="confidence"), EXITS, None)
    assert uncalibrated.thresholds == {6: 0.9, 12: 0.9, 18: 0.9}


def test_export_and_serve_with_calibrated_exits(tiny_export, corpus, tmp_path, one_torch_thread):
    """The random tiny model's exits calibrated, exported over a copy of the shared export (only
    the segments before full depth rebuild), served with the confidence policy: each request
    exits where the calibrated heads and the manifest's thresholds say."""
    from .servers import MODEL, Server

    root, directory = copy_export(tiny_export.directory, tmp_path)
    out = tmp_path / "exits"
    # a lower target than the default: the random tiny backbone's exits agree with full depth too rarely for 95%
    result = calibrate(f"calibrate.corpus={corpus}", f"calibrate.output_dir={out}", "calibrate.seq_len=128", "calibrate.max_train_tokens=8000",
                       "calibrate.max_heldout_tokens=4000", "calibrate.batch_tokens=512", "calibrate.max_steps=60", "calibrate.target_agreement=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    exits = f"model.exits={out / EXITS_NAME}"
    export = run_cli("pipeline", "export", f"engines_dir={root}", "export.progress=false", exits)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "3 built, 13 cached" in export.stderr  # segment.0..2: the full-depth segment holds no calibrated head
    manifest = Manifest.load(directory)
    info, _ = read_exits(out / EXITS_NAME)
    assert manifest.exits["sha256"] == info.sha256 == manifest.model["weights"]["exits"]
    thresholds = {int(k): v for k, v in manifest.exits["thresholds"].items()}
    assert thresholds == info.thresholds and any(t is not None for t in thresholds.values())

    # where each prompt must exit: the first exit whose calibrated head is sure enough at the prompt's last token
    model = build_model(dataclasses.replace(tiny_config(), exits=str(out / EXITS_NAME)))
    prompts = ["Open WeChat", "你是谁?", "Scroll through the gallery and share a photo.", "Why can't I update Maps? Explain.", "Say hello."]
    expected = {}
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([TOK.apply_chat_template([{"role": "user", "content": p}])])
            top1 = {e: float(torch.softmax(model(x, e)[0, -1, :TOK.vocab_size], -1).max()) for e in EXITS[:-1]}
            expected[p] = next((e for e in EXITS[:-1] if thresholds[e] is not None and top1[e] >= thresholds[e]), 24)
    assert len(set(expected.values())) >= 2, expected  # else this would not show the per-exit thresholds at work
    server = Server(root, tmp_path / "server.log", exits, "runtime.policy.name=confidence")
    try:
        for p in prompts:
            r = server.post({"model": MODEL, "messages": [{"role": "user", "content": p}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["dyngraph"]["exit_layer"] == expected[p], (p, expected)
        assert "confidence policy, calibrated top-1 thresholds" in server.logs()
    finally:
        server.stop()


def test_adapter_exports_and_validates(tmp_path, one_torch_thread):
    """A segment whose exit has a trained (non-zero) adapter, loaded from an exits file, through
    the real exporter and the export's validation against its eager module."""
    from exporters import get_exporter
    from model.exits import save_exits
    from contract.engines import Limits, engine_specs, model_dims
    from pipeline.export import validate_and_commit

    from .conftest import compose_export

    app = compose_export(["model=tiny", "model.text.exit_adapter_rank=4"])
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k in range(3):
        tensors |= {f"text.segments.{k}.exit_norm.weight": 1 + 0.1 * torch.randn(128, generator=g),
                    f"text.segments.{k}.exit_adapter.down.weight": 0.1 * torch.randn(4, 128, generator=g),
                    f"text.segments.{k}.exit_adapter.up.weight": 0.5 * torch.randn(128, 4, generator=g)}
    path = save_exits(tensors, tmp_path / EXITS_NAME, exit_layers=EXITS[:-1], adapter_rank=4, thresholds={6: 0.5, 12: None, 18: 0.2},
                      target_agreement=0.9, base_weights={}, calibration={}).path
    model = build_model(dataclasses.replace(app.model, exits=str(path)))
    # what the exit computes: the norm, then h + up(down(h))
    h = torch.randn(3, 128, generator=g)
    norm = tensors["text.segments.0.exit_norm.weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    want = norm + norm @ tensors["text.segments.0.exit_adapter.down.weight"].T @ tensors["text.segments.0.exit_adapter.up.weight"].T
    torch.testing.assert_close(model.text.segments[0].exit(h), want)

    limits = Limits(2, 16, 32)
    spec = next(s for s in engine_specs(model, limits) if s.name == "segment.0")
    dims, exporter = model_dims(model, limits), get_exporter(app.export)
    (tmp_path / "stage").mkdir()
    stem = tmp_path / "stage" / "segment.0-0000000000000001"
    exporter.build([spec], dims, [stem], tmp_path)
    record = validate_and_commit(spec, stem, "0000000000000001", dims, exporter, app.export, tmp_path, lambda stage: None)
    assert record.max_rel_error < 1e-4  # validation itself fails past the fp32 tolerance


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


@pytest.mark.parametrize("case", ["empty", "undecodable", "checkpoint", "target"])
def test_bad_input_fails_in_one_line(case, tmp_path, corpus):
    out = tmp_path / "out"
    overrides, message = [f"calibrate.corpus={corpus}", f"calibrate.output_dir={out}"], ""
    if case == "empty":
        (tmp_path / "empty").mkdir()
        overrides[0], message = f"calibrate.corpus={tmp_path / 'empty'}", "has no .txt or .jsonl files"
    elif case == "undecodable":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.txt").write_text("fine\n")
        (tmp_path / "bad" / "b.txt").write_bytes(b"caf\xe9 latin-1, \xff\xfe")
        overrides[0], message = f"calibrate.corpus={tmp_path / 'bad'}", f"corpus file {tmp_path / 'bad' / 'b.txt'} is not UTF-8 text"
    elif case == "checkpoint":
        write_bad_checkpoint(tmp_path / "ckpt")
        TOK.tokenizer.save(str(tmp_path / "ckpt" / "tokenizer.json"))
        overrides.append(f"model.checkpoint={tmp_path / 'ckpt'}")
        message = "model.embed_tokens.weight has shape [512, 64] but text.embed_tokens.weight expects [512, 128]"
    else:
        overrides.append("calibrate.target_agreement=1.5")
        message = "calibrate.target_agreement=1.5 must lie in (0, 1]"
    result = calibrate(*overrides)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[ERROR] calibrate failed:") and message in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_exits_file_that_does_not_fit(calibrated, tmp_path):
    cfg = tiny_config(exits=str(calibrated / EXITS_NAME))  # calibrated with rank-8 adapters, this model has none
    with pytest.raises(ExitsError, match="exit_adapter.down.weight .* has no counterpart in the model .*adapter_rank 8"):
        build_model(cfg)
    cfg.text.exit_adapter_rank = 4
    with pytest.raises(ExitsError, match=r"has shape \[8, 128\] but the model expects \[4, 128\]"):
        build_model(cfg)
    # the export refuses heads calibrated on other weights (here: the checkpoint's, for random ones) before it builds anything
    from pipeline.export import ExportError, run_export

    from .conftest import compose_export

    app = compose_export(["model=tiny", f"model.exits={calibrated / EXITS_NAME}", f"model.text.exit_adapter_rank={RANK}"])
    with pytest.raises(ExportError, match="was calibrated on weights .*'checkpoint': '[0-9a-f]{64}'.* this export's are {'checkpoint': None, 'seed': 0, 'init_device': 'cpu'}"):
        run_export(app.model, app.export, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_exits_are_found_beside_the_checkpoint(tmp_path):
    (tmp_path / "exits").mkdir()
    (tmp_path / "exits" / EXITS_NAME).write_bytes(b"")
    assert resolve_exits(tiny_config(checkpoint=str(tmp_path))) == tmp_path / "exits" / EXITS_NAME  # model.exits=auto
    assert resolve_exits(tiny_config(checkpoint=str(tmp_path), exits=None)) is None
    assert resolve_exits(tiny_config(checkpoint=str(tmp_path / "other"))) is None
    assert resolve_exits(tiny_config(exits="elsewhere.safetensors")) == Path("elsewhere.safetensors")


# --- the bench's quality column -----------------------------------------------------------------


def test_token_agreement():
    # a CJK character spread over three byte tokens reaches the client with its last token
    assert token_texts(["", "", "你", "a", "", ""]) == ["你", "你", "你", "a", "", ""]
    assert agreement(["", "", "你", "b"], ["", "", "好", "b"]) == (1, 4)
    assert agreement(["a", "b"], ["a", "b", "c"]) == (2, 3)  # a missing token counts as different
    run = lambda c, tokens: {"concurrency": c, "requests": [{"index": 0, "group": "g", "ok": True, "tokens": tokens}]}  # noqa: E731
    blocks = {"static": {"runs": [run(1, ["a", "b"]), run(4, ["a", "b"])], "server": {"command": ["runtime.mode=static"]}},
              "dynamic": {"runs": [run(1, ["a", "c"]), run(4, ["a", "b"])], "server": {"command": ["runtime.policy.name=confidence"]}}}
    q = quality_block(blocks, temperature=0.0)
    assert q["modes"]["static"]["token_agreement"] == 1.0
    assert q["modes"]["dynamic"] == {"token_agreement": 0.75, "tokens": 4, "per_concurrency": {"1": 0.5, "4": 1.0}, "per_group": {"g": 0.75},
                                     "settings": ["runtime.policy.name=confidence"]}
    assert "no greedy reference" in quality_block(blocks, temperature=0.7)["reason"]
