"""`python -m pipeline calibrate calibrate.mode=model` on the CPU: LayerSkip training of the
reference-cpu model on a code corpus built by scripts/build_corpus.py --code, the checkpoint folder
it writes (loaded, exported, served), resuming, the recipe's schedules, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers

from model.autoglm import build_model
from model.exits import EXITS_NAME, read_exits
from model.tokenizer import ChatTokenizer
from calibrate.quality import mean_accepted
from calibrate.train import dropout_rates, enabled_exits, exit_hidden, exit_weights, run_train
from cli.command import register_configs

from .conftest import CONF_DIR, ROOT, compose_export

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["json", "email", "http", "urllib", "logging"]  # ~1 MB of the standard library: a corpus that builds in seconds
STEPS = 60
# stated margins (measured on 2 cores: see the final report / README)
LOSS_DROP = 0.8  # every exit's held-out loss falls by at least this many nats from its start (ln 512 = 6.24)
FULL_DEPTH_SLACK = 0.03  # exit losses keep the full-depth held-out loss within 3% of the same run without them
COMMON = [f"calibrate.max_steps={STEPS}", "calibrate.max_minutes=0", "calibrate.seq_len=64", "calibrate.batch_tokens=1024",
          "calibrate.max_heldout_tokens=4096", "calibrate.lr=0.01", "calibrate.warmup_steps=10", "calibrate.progress=false",
          "calibrate.target_agreement=0.9"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_corpus(out: Path) -> subprocess.CompletedProcess:
    sources = [a for s in SOURCES for a in ("--source", str(STDLIB / s))]
    return subprocess.run([sys.executable, "scripts/build_corpus.py", str(out), "--code", "--max-mb", "1", "--vocab-size", "512",
                           "--heldout-fraction", "0.1", *sources], cwd=ROOT, capture_output=True, text=True, timeout=300)


def compose_calibrate(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="calibrate", overrides=overrides))


def corpus_overrides(corpus: Path) -> list[str]:
    return [f"calibrate.corpus={corpus / 'train'}", f"calibrate.heldout_corpus={corpus / 'heldout'}", f"tokenizer={corpus}"]


def train(corpus: Path, out: Path, *overrides: str) -> Path | None:
    app = compose_calibrate(["+preset=reference-cpu-train", *corpus_overrides(corpus), *COMMON, f"calibrate.output_dir={out}", *overrides])
    return run_train(app, Console(stderr=True, quiet=True))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("code") / "corpus"
    result = build_corpus(out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    return train(corpus, tmp_path_factory.mktemp("trained") / "ckpt")


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory) -> Path:
    """The same run without the early-exit losses."""
    return train(corpus, tmp_path_factory.mktemp("baseline") / "ckpt", "calibrate.train.early_exit_loss=false")


def report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


# --- the corpus -------------------------------------------------------------------------------


def test_code_corpus_is_held_out_by_file_and_reproducible(corpus, tmp_path):
    again = tmp_path / "again"
    assert build_corpus(again).returncode == 0
    for name in ("corpus.json", "tokenizer.json", "train/chats.jsonl"):
        assert (again / name).read_bytes() == (corpus / name).read_bytes(), name  # same seed, same image: same bytes
    record = json.loads((corpus / "corpus.json").read_text())
    train_files, held_files = (set(record["parts"][p]["names"]) for p in ("train", "heldout"))
    assert held_files and train_files
    strip = lambda names: {n.split("-", 1)[1] for n in names}  # noqa: E731  (the number is the position in its part)
    assert not strip(train_files) & strip(held_files)
    tok = ChatTokenizer.from_dir(corpus)  # has GLM-4's chat specials
    assert tok.vocab_size == 512 and tok.token_id("<|endoftext|>") == 0


# --- the recipe -------------------------------------------------------------------------------


def test_training_forward_equals_the_eager_model(one_torch_thread):
    model = build_model(compose_export(["model=reference-cpu"]).model)
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = exit_hidden(model.text, ids)
        for layer, h in zip(model.cfg.text.exit_layers, hs):
            torch.testing.assert_close(model.text.lm_head(h), model(ids, layer), atol=1e-5, rtol=1e-5)


def test_recipe_schedules():
    app = compose_calibrate(["model=phone-9b", "calibrate=train-gpu", "calibrate.train.exit_weights=null", "calibrate.train.exit_scale=1.0"])
    weights, _ = exit_weights(app)
    assert weights == [15.0, 66.0, 153.0, 23 + 253.0]  # e(l) = e_scale * sum_{i<=l} i at layer indices 5, 11, 17; the last adds L-1
    app.calibrate.train.curriculum, app.calibrate.train.rotation = "rotational", 2
    assert [enabled_exits(app, t, 0.0) for t in range(2)] == [[True, False, True, True], [False, True, False, True]]
    app.calibrate.train.curriculum, app.calibrate.train.gradual_fraction = "gradual", 0.5
    assert enabled_exits(app, 0, 0.0) == [False, False, False, True]
    assert enabled_exits(app, 0, 0.2) == [False, False, True, True]  # layer index 17 > (1 - 0.4) * 23
    assert enabled_exits(app, 0, 0.5) == [True, True, True, True]
    app.calibrate.train.layer_dropout = 0.2
    rates = dropout_rates(app, 1.0, from_scratch=True)  # S(T) = 1
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and bool((rates[1:] > rates[:-1]).all())
    assert float(dropout_rates(app, 0.0, from_scratch=True).max()) == 0  # from scratch it starts at 0
    assert dropout_rates(app, 0.0, from_scratch=False)[-1] == pytest.approx(0.2)  # from a checkpoint, at full strength


def test_mean_accepted_run():
    agree = np.array([[1, 1, 0, 1, 1, 1, 0, 0]], dtype=bool)
    # k=2 from positions 0..5: runs 2, 1, 0, 2, 2, 1
    assert mean_accepted(agree, 2) == pytest.approx(8 / 6)
    assert mean_accepted(np.ones((3, 10), dtype=bool), 4) == 4.0


# --- training ---------------------------------------------------------------------------------


def test_training_lowers_every_exits_held_out_loss(trained):
    r = report(trained)
    assert r["training"]["steps"] == STEPS and r["training"]["stopped_by"] == "calibrate.max_steps"
    for before, after in zip(r["before"]["exits"], r["after"]["exits"]):
        assert after["loss"] <= before["loss"] - LOSS_DROP, (before["exit_layer"], before["loss"], after["loss"])
        assert after["next_token_accuracy"] > before["next_token_accuracy"]
    for e in r["after"]["exits"][:-1]:
        assert set(e["by_confidence"]) == {"0.5", "0.7", "0.8", "0.9", "0.95"} and set(e["draft_mean_accepted"]) == {"2", "4", "6"}
        assert 0 <= e["draft_mean_accepted"]["2"] <= 2
    names = {p.name for p in trained.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "exits", "report.json", "report.md", "training.png", "agreement.png"}
    assert "| exit | loss before | loss after |" in (trained / "report.md").read_text()
    assert not list(trained.parent.glob(".ckpt.*"))  # no staging folder and, the run complete, no state left


def test_exit_losses_keep_the_full_depth_loss(trained, baseline):
    with_exits, without = report(trained)["after"]["exits"], report(baseline)["after"]["exits"]
    assert with_exits[-1]["loss"] <= without[-1]["loss"] * (1 + FULL_DEPTH_SLACK), (with_exits[-1], without[-1])
    assert with_exits[0]["loss"] < without[0]["loss"]  # and exit 2 is what they buy


def test_checkpoint_round_trips_through_load_export_and_serve(trained, corpus, tmp_path):
    """Loaded with model.checkpoint= (exits found by model.exits=auto), the eager model gives the
    report's held-out losses; exported by the real exporter, the engines' greedy tokens equal eager's."""
    from pipeline.export import run_export

    from .test_runtime import Running, eager_greedy, forced, make_engine, request

    r = report(trained)
    app = compose_export(["model=reference-cpu", f"model.checkpoint={trained}", "export.progress=false"])
    model = build_model(app.model)
    info, _ = read_exits(trained / "exits" / EXITS_NAME)
    assert info.thresholds == {int(k): v for k, v in r["files"]["exits"]["thresholds"].items()}
    tok = ChatTokenizer.from_dir(trained)
    assert tok.tokenizer.to_str() == ChatTokenizer.from_dir(corpus).tokenizer.to_str()
    # the report's held-out windows, through AutoGLM.forward at each exit
    from calibrate.run import read_corpus
    from calibrate.train import token_stream

    held = token_stream(read_corpus(str(corpus / "heldout"), tok).documents, tok.token_id("<|endoftext|>"), 4096 + 1)
    windows = torch.stack([held[i * 64:(i + 1) * 64 + 1] for i in range((held.numel() - 1) // 64)]).long()
    with torch.no_grad():
        for e in r["after"]["exits"]:
            loss = F.cross_entropy(model(windows[:, :-1], e["exit_layer"]).transpose(1, 2), windows[:, 1:])
            assert float(loss) == pytest.approx(e["loss"], abs=1e-4), e["exit_layer"]

    result = run_export(app.model, app.export, tmp_path / "engines", console=Console(stderr=True, quiet=True))
    assert result.manifest.exits["sha256"] == info.sha256
    from runtime.engines import EngineSet

    running = Running(make_engine(EngineSet(result.directory), tok, **forced(8)))
    try:
        prompts = ["def parse(data):", "Explain `json.loads`.", "import email"]
        tokens = running.tokens(*(request(tok, p, 8) for p in prompts))
        for p, (_, ids) in zip(prompts, tokens):
            assert ids == eager_greedy(model, tok, tok.apply_chat_template([{"role": "user", "content": p}]), 8, 8), p
    finally:
        running.close()


def test_continual_training_starts_where_the_checkpoint_ended(trained, corpus, tmp_path):
    out = train(corpus, tmp_path / "more", f"model.checkpoint={trained}", "calibrate.max_steps=5")
    r, base = report(out), report(trained)
    assert r["model"]["start"] == str(trained) and r["recipe"]["dropout_time_ramp"] is False  # S(t) = 1 from a checkpoint
    for before, ended in zip(r["before"]["exits"], base["after"]["exits"]):
        assert before["loss"] == pytest.approx(ended["loss"], abs=1e-4), before["exit_layer"]  # its exit heads loaded too (model.exits=auto)


def test_a_paused_run_resumes_to_the_same_weights(trained, corpus, tmp_path):
    out = tmp_path / "ckpt"
    assert train(corpus, out, f"calibrate.train.pause_after_steps={STEPS // 2}") is None
    state = tmp_path / ".ckpt.train-state"
    assert (state / "state.json").is_file() and (state / "state.safetensors").is_file() and not out.exists()
    assert json.loads((state / "state.json").read_text())["step"] == STEPS // 2
    assert train(corpus, out) == out
    assert report(out)["training"]["sessions"] == 2 and not state.exists()
    # the same seed and corpus: the same batches and dropout draws, so the same bytes as the run in one go
    assert (out / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


def test_bad_input_fails_in_one_line(corpus, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(plain / "tokenizer.json"))
    cases = {
        "empty corpus": ([f"calibrate.corpus={tmp_path / 'empty'}", f"tokenizer={corpus}"], "has no .txt or .jsonl files"),
        "no chat specials": ([f"calibrate.corpus={corpus / 'train'}", f"tokenizer={plain}"], "tokenizer lacks the GLM-4 chat special tokens"),
        "vocabulary": ([*corpus_overrides(corpus), "model.text.vocab_size=256"], "more than the model's vocabulary of 256"),
        "checkpoint shapes": ([*corpus_overrides(corpus), "model.text.dim=128", f"model.checkpoint={trained}"], "config.json has hidden_size=64 but model.text.dim=128"),
    }
    procs = {}
    for name, (overrides, _) in cases.items():  # concurrently: each is mostly interpreter start-up
        out = tmp_path / name.replace(" ", "-") / "out"
        procs[name] = (out, subprocess.Popen([sys.executable, "-m", "pipeline", "calibrate", "+preset=reference-cpu-train", *COMMON,
                                              f"calibrate.output_dir={out}", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
    for name, (out, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("[ERROR] calibrate failed:") and cases[name][1] in lines[0], (name, stderr[-2000:])
        assert not out.parent.exists() or not list(out.parent.iterdir()), (name, list(out.parent.iterdir()))
