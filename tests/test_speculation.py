"""Self-speculative decoding on the tiny export: drafts from an early exit, verified by the deeper
segments, give the full path's tokens (greedy) or its distribution (sampled); the caches end as a
plain run leaves them; the bookkeeping is right at both ends (no draft accepted, every draft
accepted); bad settings get one line."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from rich.console import Console

from model.checkpoint import save_glm_checkpoint
from runtime.config import PolicyConfig, SpeculationConfig
from runtime.engines import EngineSet
from runtime.generation import EngineConfigError
from runtime.requests import Finished
from runtime.sampling import Sampler, SamplingParams
from runtime.speculation import Draft, accept
from runtime.step import Row, Stepper
from .conftest import compose_export, run_cli
from .test_quantize import int8_export  # noqa: F401 (a fixture)
from .test_runtime import GREEDY, Running, eager_greedy, make_engine, media, request  # noqa: F401 (media: a fixture)
from .servers import MODEL, Server, chat, user

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello there, how are you", "explain why the sky is blue step by step", "a", "write a poem about rain and code"]


@pytest.fixture(scope="module")
def engines(tiny_engines_dir) -> EngineSet:
    return EngineSet(tiny_engines_dir)


@pytest.fixture(scope="module")
def tok():
    from model.tokenizer import ChatTokenizer

    return ChatTokenizer.builtin()


def spec(**kw) -> dict:
    return {"speculation": SpeculationConfig(enabled=True, **kw)}


def generate(engines, tok, requests, **runtime) -> list[Finished]:
    r = Running(make_engine(engines, tok, **runtime))
    try:
        return [events[-1] for events in r.run(*requests)]
    finally:
        r.close()


def media_requests(tok, media, n: int, **kw):
    pixels, mel = media
    return [request(tok, "describe this", n, ("text", "image"), pixels, None, **kw),
            request(tok, "what is this sound", n, ("text", "audio"), None, mel, **kw),
            request(tok, "both", n, ("text", "image", "audio"), pixels, mel, **kw)]


# --- greedy: the full path's tokens, token for token --------------------------------------------------


@pytest.mark.parametrize("exit_layer, draft_exit", [(24, 6), (24, 12), (18, 6), (12, 6), (24, 18)])
def test_greedy_speculation_gives_the_plain_runs_tokens_on_every_path(engines, tok, media, exit_layer, draft_exit):
    def requests():
        return [request(tok, t, 12, ignore_eos=True) for t in TEXTS[:2]] + media_requests(tok, media, 12, ignore_eos=True)

    policy = {"policy": PolicyConfig(force_exit=exit_layer)}
    plain = generate(engines, tok, requests(), **policy)
    for k in (1, 2, 4):
        # one at a time (the default max_batch of 1), so every request drafts
        got = [generate(engines, tok, [r], **policy, **spec(draft_exit=draft_exit, draft_tokens=k))[0] for r in requests()]
        assert [g.token_ids for g in got] == [p.token_ids for p in plain], k
        for g in got:
            assert g.speculation["verifications"] > 0 and g.speculation["drafted"] >= g.speculation["verifications"]
            assert g.speculation["accepted"] <= g.speculation["drafted"]


def test_greedy_speculation_equals_the_eager_model(engines, tok, tiny_model):
    reqs = [request(tok, t, 12) for t in TEXTS]
    got = generate(engines, tok, reqs, policy=PolicyConfig(force_exit=24), **spec(draft_tokens=3))
    for r, g in zip(reqs, got):
        assert g.token_ids == eager_greedy(tiny_model, tok, r.prompt_ids, 24, 12)


def test_rows_joining_and_leaving_while_others_draft(engines, tok, media):
    """Several requests of several lengths and paths in one batch, drafting together (and plain ones
    carried along): every request's tokens are its plain run's."""
    def requests():
        texts = [request(tok, t, n, ignore_eos=True, exit_layer=e) for t, n, e in
                 zip(TEXTS, (5, 17, 9, 23), (24, 6, 18, 12))]
        return texts + media_requests(tok, media, 11, ignore_eos=True)

    override = PolicyConfig(request_override=True)
    plain = generate(engines, tok, requests(), policy=override)
    for k, adaptive in ((2, False), (4, True)):
        got = generate(engines, tok, requests(), policy=override, **spec(draft_tokens=k, adaptive=adaptive, max_batch=8))
        assert [g.token_ids for g in got] == [p.token_ids for p in plain]
        assert [g.reason for g in got] == [p.reason for p in plain]
        # the exit-6 request cannot draft at exit 6: it runs plainly beside the others
        assert got[1].speculation is None and all(got[i].speculation for i in (0, 2, 3))


def test_stops_and_max_tokens_land_where_the_plain_run_ends(engines, tok):
    plain = generate(engines, tok, [request(tok, "count with me", 30)], policy=PolicyConfig(force_exit=24))[0]
    text = tok.decode(list(plain.token_ids))
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) > 4 else None
    for n in (1, 2, 3, 7):
        for k in (2, 4):
            reqs = [request(tok, "count with me", n)] + ([request(tok, "count with me", 30, stop=(stop,))] if stop else [])
            want = generate(engines, tok, reqs, policy=PolicyConfig(force_exit=24))
            got = [generate(engines, tok, [r], policy=PolicyConfig(force_exit=24), **spec(draft_tokens=k))[0] for r in reqs]
            assert [(g.token_ids, g.reason, g.completion_tokens) for g in got] == \
                   [(w.token_ids, w.reason, w.completion_tokens) for w in want], (n, k)


# --- the caches: entry for entry what a plain run leaves ---------------------------------------------------


def test_caches_after_drafts_and_verifications_equal_a_plain_runs(engines, tok):
    """Drive the step functions by hand: a speculating sequence beside a plain one, against two plain
    sequences; every segment's entries up to each row's length agree, and the speculating row's
    tokens are the plain row's."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in TEXTS[:2]]
    capacity, steps = 128, 12

    def plain_run() -> tuple[Stepper, list[list[int]]]:
        stepper = Stepper(engines, 4, capacity, cuda_graphs=False)
        rows, out = [], [[], []]
        for key, prompt in enumerate(prompts):
            logits, _ = stepper.prefill(key, prompt, 4, None)
            rows.append(Row(key, 4, int(logits[0, :tok.vocab_size].argmax())))
            out[key].append(rows[-1].token)
        for _ in range(steps):
            keys, logits = stepper.decode(rows)
            for key, token in zip(keys, logits[:, :tok.vocab_size].argmax(-1).tolist()):
                rows[key].token = token
                out[key].append(token)
        return stepper, out

    def speculative_run() -> tuple[Stepper, list[list[int]]]:
        stepper = Stepper(engines, 4, capacity, cuda_graphs=False)
        sampler = Sampler(tok.vocab_size)
        rows, out = [], [[], []]
        for key, prompt in enumerate(prompts):
            logits, _ = stepper.prefill(key, prompt, 4, None)
            rows.append(Row(key, 4, int(logits[0, :tok.vocab_size].argmax())))
            out[key].append(rows[-1].token)
        draft = Draft(1, 3, 3, False)
        while len(out[0]) <= steps:
            rows[0].draft = 1
            keys, logits = stepper.decode(rows)
            tokens = dict(zip(keys, logits[:, :tok.vocab_size].argmax(-1).tolist()))
            if len(out[1]) <= steps:  # the plain row, carried through the deep segments
                rows[1].token = tokens[1]
                out[1].append(tokens[1])
            draft.add(tokens[0], None)
            rows[0].token = tokens[0]
            if len(draft.tokens) == draft.length:
                past = len(prompts[0]) + len(out[0]) - 1
                got, accepted = accept(draft, stepper.verify(rows[0], past, [out[0][-1], *draft.tokens[:-1]]), GREEDY, None, sampler)
                draft.settle(accepted, len(got))
                out[0] += got
                rows[0].token = got[-1]
                stepper.truncate(0, past + len(got))
        return stepper, out

    a, want = plain_run()
    b, got = speculative_run()
    n = steps + 1
    assert got[0][:n] == want[0][:n] and got[1][:n] == want[1][:n]
    for k, (ca, cb) in enumerate(zip(a.caches, b.caches)):
        for key in (0, 1):
            length = len(prompts[key]) + n - 1  # the last token is not fed yet
            ra, rb = ca.row(key), cb.row(key)
            assert int(cb.lengths[rb]) >= length
            torch.testing.assert_close(cb.buffer[:, rb, :, :length], ca.buffer[:, ra, :, :length], rtol=1e-4, atol=1e-5,
                                       msg=f"segment {k}, sequence {key}")


# --- the bookkeeping at both ends -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inert_engines(tiny_config, tmp_path_factory) -> EngineSet:
    """The tiny model with every layer past the first exit made inert (zero output and down
    projections, so the residual stream passes through unchanged): full depth predicts what exit 6 does."""
    from model.autoglm import build_model
    from pipeline.export import run_export

    torch.manual_seed(0)
    model = build_model(tiny_config)
    with torch.no_grad():
        for segment in model.text.segments[1:]:
            for layer in segment.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    root = tmp_path_factory.mktemp("inert")
    checkpoint = save_glm_checkpoint(model, root / "checkpoint")
    app = compose_export(["model=tiny", "export.progress=false", f"model.checkpoint={checkpoint}"])
    return EngineSet(run_export(app.model, app.export, root / "engines", console=Console(stderr=True, quiet=True)).directory)


def test_inert_deeper_layers_accept_every_draft(inert_engines, tok):
    n, k = 17, 4
    got = generate(inert_engines, tok, [request(tok, t, n, ignore_eos=True) for t in TEXTS[:1]],
                   policy=PolicyConfig(force_exit=24), **spec(draft_tokens=k))[0]
    c = got.speculation
    assert c["accepted"] == c["drafted"]  # every draft kept
    # n tokens: the first from the prefill, then drafts of k until fewer remain
    assert c["drafted"] == n - 1 and c["verifications"] == -(-(n - 1) // k) and c["tokens"] == n - 1


def test_random_weights_reject_drafts_and_still_yield_a_token_per_verification(engines, tok):
    got = generate(engines, tok, [request(tok, TEXTS[1], 16, ignore_eos=True)], policy=PolicyConfig(force_exit=24),
                   **spec(draft_tokens=4))[0]
    c = got.speculation
    assert c["accepted"] < c["drafted"]  # random weights: exit 6 predicts little of what full depth does
    # each verification yields its accepted drafts and, after a rejection, the full path's own token
    assert c["verifications"] <= c["tokens"] <= c["accepted"] + c["verifications"]


# --- sampling: the full path's distribution ----------------------------------------------------------------


def test_speculative_sampling_keeps_the_target_distribution():
    """One drafted position, many seeded trials on a 5-token vocabulary: the token a verification
    yields is distributed as p, whatever q drafted it (total variation under 0.015 in 40,000 draws,
    where sampling noise alone gives about 0.005)."""
    sampler = Sampler(5)
    params = SamplingParams(temperature=1.0)
    p_logits = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0])
    q = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.5, -2.0]), -1)
    p = torch.softmax(p_logits, -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    trials = 40_000
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=g))
        draft = Draft(1, 1, 1, False, [d], [q])
        tokens, _ = accept(draft, p_logits[None], params, g, sampler)
        counts[tokens[0]] += 1
    assert float((counts / trials - p).abs().sum() / 2) < 0.015


def test_seeded_speculative_sampling_reproduces(engines, tok):
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    runs = [generate(engines, tok, [request(tok, TEXTS[0], 16, sampling=sampled)], policy=PolicyConfig(force_exit=24),
                     **spec(draft_tokens=3))[0] for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].speculation == runs[1].speculation


# --- bad settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, words", [
    ({"draft_tokens": 0}, "draft_tokens=0 must lie in 1.."),
    ({"draft_tokens": 10_000}, "draft_tokens=10000 must lie in 1.."),
    ({"draft_exit": 24}, "draft_exit=24 must be an exit short of the last"),
    ({"draft_exit": 7}, "draft_exit=7 must be an exit short of the last"),
    ({"max_batch": 0}, "max_batch=0 must be at least 1"),
])
def test_bad_settings_are_refused_in_one_line(engines, tok, settings, words):
    with pytest.raises(EngineConfigError, match=words) as e:
        make_engine(engines, tok, **spec(**settings))
    assert "\n" not in str(e.value)


# --- a quantized draft -------------------------------------------------------------------------------------


def test_an_int8_draft_still_gives_the_full_models_tokens(engines, int8_export, tok):
    """Drafts through the int8 export's engines, verified from the embedding by the fp32 export's:
    the tokens are the plain fp32 run's, and int8 drafts agree with fp32 far more often than not."""
    draft = EngineSet(int8_export.directory)
    reqs = [request(tok, t, 16, ignore_eos=True) for t in TEXTS]
    plain = generate(engines, tok, reqs, policy=PolicyConfig(force_exit=24))
    for draft_exit in (6, 18):
        r = Running(make_engine(engines, tok, policy=PolicyConfig(force_exit=24), **spec(draft_tokens=3, draft_exit=draft_exit),
                                draft_engines=draft))
        try:
            got = [r.run(q)[0][-1] for q in reqs]
        finally:
            r.close()
        assert [g.token_ids for g in got] == [p.token_ids for p in plain], draft_exit
    assert all(g.speculation["verifications"] for g in got)


# --- through the server, with the openai client ---------------------------------------------------------------


def test_the_server_speculates_per_request_and_reports_it(engines_root, tiny_export, tmp_path):
    server = Server(engines_root, tmp_path / "serve.log", "runtime.policy.force_exit=24", "runtime.speculation.enabled=false",
                    "runtime.speculation.draft_tokens=3")
    try:
        ask = dict(messages=user("Open the camera"), max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        plain, _ = chat(server, **ask)
        assert "speculation" not in plain["dyngraph"]
        for draft_exit in (6, 12):
            body, _ = chat(server, **ask | {"extra_body": {"ignore_eos": True, "speculative": True, "draft_exit": draft_exit}})
            assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
            c = body["dyngraph"]["speculation"]
            assert c["verifications"] >= 1 and c["drafted"] >= c["accepted"]
        stream = server.client().chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **ask
                                                         | {"extra_body": {"ignore_eos": True, "speculative": True}})
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == plain["choices"][0]["message"]["content"]
        stats = httpx.get(f"{server.url}/stats").json()["speculation"]
        assert stats["exit24-text"]["verifications"] >= 3
        assert server.metric("dyngraph_speculation_total", kind="drafted", path="exit24-text") >= 3
        assert "drafting 3 tokens at exit 6" in server.logs() and "speculated:" in server.logs()
        bad = server.post({"model": MODEL, "messages": user("hi"), "speculative": True, "draft_exit": 24})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "draft_exit"
    finally:
        server.stop()


# --- the bench -------------------------------------------------------------------------------------------


def test_bench_speculation_reports_every_configuration(engines_root, tiny_export, tmp_path):
    result = run_cli("pipeline", "bench", "bench=speculation", f"engines_dir={engines_root}", f"output_dir={tmp_path}", "run_name=spec",
                     "bench.concurrency=[1,2]", "bench.speculation.requests=2", "bench.speculation.max_tokens=6",
                     "bench.speculation.draft_tokens=[2]", "bench.speculation.draft_exits=[6,18]", "progress=false")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "spec" / "speculation.json").read_text())
    runs = {(r["draft_exit"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(e, c) for e in (None, 6, 18) for c in (1, 2)}
    for (draft_exit, _), run in runs.items():
        assert run["tokens_equal"] == 1.0  # greedy: speculation keeps full depth's tokens
        assert run["completion_tokens"] == 2 * 6
        if draft_exit is None:
            assert run["drafted"] == 0 and run["speedup_tokens_per_s"] == 1.0
        else:
            assert run["verifications"] > 0 and 0 <= run["acceptance"] <= 1 and run["tokens_per_verification"] >= 1
    hf = report["transformers"]
    assert [row["draft_exit"] for row in hf["rows"]] == [None, 6, 18] and hf["rows"][0]["tokens_equal"] == 1.0
    for name in ("speculation.md", "speculation.png", "server-k2.log"):
        assert (tmp_path / "spec" / name).stat().st_size > 0
    assert "| draft 2 at exit 18 | 2 |" in (tmp_path / "spec" / "speculation.md").read_text()


def test_bench_speculation_refuses_a_draft_exit_that_is_not_one(engines_root, tiny_export, tmp_path):
    result = run_cli("pipeline", "bench", "bench=speculation", f"engines_dir={engines_root}", f"output_dir={tmp_path}",
                     "bench.speculation.draft_exits=[24]")
    assert result.returncode != 0 and "draft_exits=[24] must be exits short of the last" in result.stderr
    assert "Traceback" not in result.stderr
