"""The checkpoint loader against transformers' own GlmForCausalLM: same weights, same logits."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.autoglm import ModelConfig, build_model
from model.checkpoint import CheckpointError, checkpoint_fingerprint, load_glm_checkpoint
from cli.command import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tiny_config(**overrides) -> ModelConfig:
    """conf/model/tiny.yaml as the ModelConfig the export app would see."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="export", overrides=["model=tiny"]).model)
    return dataclasses.replace(cfg, **overrides)


def hf_config(cfg: ModelConfig, **overrides):
    t = cfg.text
    return transformers.GlmConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.dim,
        intermediate_size=t.ffn_dim,
        num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.norm_eps,
        attention_bias=t.attention_bias,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "partial_rotary_factor": t.partial_rotary_factor},
        pad_token_id=None,  # GlmConfig's default (151329) lies outside the tiny vocabulary
        **overrides,
    )


def random_hf_model(cfg: ModelConfig, **overrides):
    torch.manual_seed(0)
    # 5x HF's default init scale: logits of std ~1 rather than ~0.2, so 1e-4 catches small slips
    overrides.setdefault("initializer_range", 0.1)
    hf = transformers.GlmForCausalLM(hf_config(cfg, **overrides)).float().eval()
    with torch.no_grad():
        # HF initialises norms to 1 and biases to 0; random values make a mis-mapped tensor visible
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, object]:
    directory = tmp_path_factory.mktemp("glm")
    hf = random_hf_model(tiny_config())
    hf.save_pretrained(directory, safe_serialization=True)
    return directory, hf


def copy_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint with its (single-file) tensors changed by `edit(tensors)`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_logits_match_transformers(checkpoint):
    directory, hf = checkpoint
    model = build_model(tiny_config(checkpoint=str(directory)))
    ids = torch.randint(0, model.cfg.text.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_loaded_names(checkpoint):
    directory, _ = checkpoint
    cfg = tiny_config()
    model = build_model(cfg)
    loaded = load_glm_checkpoint(model, directory)
    assert "text.segments.1.layers.2.self_attn.q_proj.weight" in loaded
    assert "text.segments.3.exit_norm.weight" in loaded  # HF's model.norm closes the full depth
    assert "text.segments.0.exit_norm.weight" not in loaded
    assert not any(n.startswith(("vision.", "audio.", "cross_attn.")) for n in loaded)
    decoder = [n for n, _ in model.named_parameters() if n.startswith("text.") and "exit_norm" not in n]
    assert set(decoder) <= loaded
    # layer 8 of HF is layer 2 of the second segment (exits at 6/12/18/24)
    torch.testing.assert_close(
        model.text.segments[1].layers[2].mlp.down_proj.weight,
        load_file(directory / "model.safetensors")["model.layers.8.mlp.down_proj.weight"],
    )


def test_misshaped_tensor(checkpoint, tmp_path):
    directory, _ = checkpoint
    key = "model.layers.3.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[key] = tensors[key][:32].contiguous()

    bad = copy_checkpoint(directory, tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError, match=rf"{key} has shape \[32, 128\] but .* expects \[64, 128\]"):
        build_model(tiny_config(checkpoint=str(bad)))


def test_missing_tensors(checkpoint, tmp_path):
    directory, _ = checkpoint

    def drop_layer_5(tensors):
        for key in [k for k in tensors if k.startswith("model.layers.5.")]:
            del tensors[key]

    bad = copy_checkpoint(directory, tmp_path / "bad", drop_layer_5)
    with pytest.raises(CheckpointError, match=r"lacks 11 required decoder tensors: model\.layers\.5\..*, \.\.\.$"):
        build_model(tiny_config(checkpoint=str(bad)))


def test_unknown_layer_tensor_is_refused(checkpoint, tmp_path):
    directory, _ = checkpoint

    def add_sandwich_norm(tensors):  # GLM-4-0414 layers have norms model/glm.py lacks
        tensors["model.layers.0.post_mlp_layernorm.weight"] = torch.ones(128)

    bad = copy_checkpoint(directory, tmp_path / "bad", add_sandwich_norm)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.post_mlp_layernorm\.weight has no counterpart"):
        build_model(tiny_config(checkpoint=str(bad)))


def test_unknown_tensor_is_skipped(checkpoint, tmp_path, caplog):
    directory, _ = checkpoint

    def add_inv_freq(tensors):
        tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    extra = copy_checkpoint(directory, tmp_path / "extra", add_inv_freq)
    with caplog.at_level("WARNING", logger="model.checkpoint"):
        build_model(tiny_config(checkpoint=str(extra)))
    assert "skipped 2 tensors" in caplog.text and "model.rotary_emb.inv_freq" in caplog.text


def test_config_mismatch(checkpoint):
    directory, _ = checkpoint
    cfg = tiny_config(checkpoint=str(directory))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, dim=256, norm_eps=1e-6))
    with pytest.raises(CheckpointError, match=r"config\.json has hidden_size=128 but model\.text\.dim=256; rms_norm_eps=1e-05 but model\.text\.norm_eps=1e-06"):
        build_model(cfg)


def test_partial_rotary_factor_at_top_level(checkpoint, tmp_path):
    # transformers 4.x wrote RoPE settings at the top level of config.json
    directory, _ = checkpoint
    old = copy_checkpoint(directory, tmp_path / "old", lambda tensors: None)
    config = json.loads((old / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(partial_rotary_factor=1.0, rope_theta=10000.0)
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"partial_rotary_factor=1\.0 but model\.text\.partial_rotary_factor=0\.5"):
        build_model(tiny_config(checkpoint=str(old)))


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(tiny_config(checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(CheckpointError, match="no config.json"):
        build_model(tiny_config(checkpoint=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        build_model(tiny_config(checkpoint=str(tmp_path)))


def test_tied_embeddings(tmp_path):
    cfg = tiny_config()
    hf = random_hf_model(cfg, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = build_model(dataclasses.replace(cfg, checkpoint=str(tmp_path)))
    torch.testing.assert_close(model.text.lm_head.weight, model.text.embed_tokens.weight)
    ids = torch.randint(0, cfg.text.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_fingerprint(checkpoint, tmp_path):
    directory, _ = checkpoint
    same = copy_checkpoint(directory, tmp_path / "same", lambda tensors: None)
    changed = copy_checkpoint(directory, tmp_path / "changed", lambda t: t["model.norm.weight"].add_(1.0))
    moved = Path(shutil.copytree(same, tmp_path / "moved"))
    (moved / "README.md").write_text("not a weight")
    assert checkpoint_fingerprint(moved) == checkpoint_fingerprint(same)  # the content, wherever it lies and whatever lies beside it
    assert len(checkpoint_fingerprint(same)) == 64
    assert checkpoint_fingerprint(same) != checkpoint_fingerprint(changed)
