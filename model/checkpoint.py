"""Load a Hugging Face GLM checkpoint (GlmForCausalLM layout) into our early-exit decoder.

Only the decoder comes from the checkpoint: HF's flat `model.layers.{i}` are spread over our
exit segments, `model.norm` becomes the norm of the last (full-depth) exit, and the LM head is
shared as it is in HF. The other exits' norms, the encoders and the cross-attention have no
counterpart and stay random (build_model logs which). A layer tensor with no place in our
DecoderLayer is refused rather than dropped: GLM-4-0414 ("glm4") checkpoints carry two extra
norms per layer that model/glm.py does not implement, and would otherwise load and run wrongly.

Tensors are read one at a time with `safe_open` and copied into the already allocated
parameters, so loading a 9B checkpoint never holds two copies of the weights in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from .autoglm import AutoGLM
    from .glm import ModelArgs

log = logging.getLogger(__name__)

MODEL_TYPES = ("glm", "glm4")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
CHUNK = 8 << 20  # 8 MiB: the fingerprint streams multi-GB shards without reading them whole


class CheckpointError(ValueError):
    """A checkpoint that does not fit the configured model; the message names what differs."""


def checkpoint_files(directory: str | Path) -> tuple[Path, list[Path]]:
    """config.json and the sorted *.safetensors shards of a checkpoint directory."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    config = root / "config.json"
    if not config.is_file():
        raise CheckpointError(f"checkpoint {root} has no config.json")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {root} has no *.safetensors files (only safetensors checkpoints are supported)")
    return config, shards


def checkpoint_fingerprint(directory: str | Path) -> str:
    """sha256 over the bytes of config.json and every shard, in file-name order."""
    config, shards = checkpoint_files(directory)
    digest = hashlib.sha256()
    for path in sorted([config, *shards], key=lambda p: p.name):
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def rope_setting(hf: dict[str, Any], key: str, default: Any) -> Any:
    # transformers 5.x nests RoPE settings under "rope_parameters"; 4.x kept them at the top level
    nested = hf.get("rope_parameters") or {}
    return nested.get(key, hf.get(key, default))


def same_value(theirs: Any, ours: Any) -> bool:
    # norm_eps comes from YAML and rms_norm_eps from JSON: floats get a tolerance, the rest must be equal
    if isinstance(ours, float) and isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        return math.isclose(theirs, ours, rel_tol=1e-6)
    return theirs == ours


def check_config(root: Path, hf: dict[str, Any], args: ModelArgs) -> None:
    """Raise one CheckpointError naming every field where config.json and model.text differ."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"checkpoint {root} config.json has model_type={model_type!r}; expected one of {MODEL_TYPES}")
    heads = hf.get("num_attention_heads")
    # (HF field, its value, our field, our value); HF defaults as in GlmConfig where a field may be absent
    fields = [
        ("hidden_size", hf.get("hidden_size"), "dim", args.dim),
        ("num_hidden_layers", hf.get("num_hidden_layers"), "n_layers", args.n_layers),
        ("num_attention_heads", heads, "n_heads", args.n_heads),
        ("num_key_value_heads", hf.get("num_key_value_heads", heads), "n_kv_heads", args.n_kv_heads),
        ("head_dim", hf.get("head_dim") or hf.get("hidden_size", 0) // (heads or 1), "head_dim", args.head_dim),
        ("vocab_size", hf.get("vocab_size"), "vocab_size", args.vocab_size),
        ("intermediate_size", hf.get("intermediate_size"), "ffn_dim", args.ffn_dim),
        ("attention_bias", hf.get("attention_bias", True), "attention_bias", args.attention_bias),
        ("partial_rotary_factor", rope_setting(hf, "partial_rotary_factor", 0.5), "partial_rotary_factor", args.partial_rotary_factor),
        ("rope_theta", rope_setting(hf, "rope_theta", 10000.0), "rope_theta", args.rope_theta),
        ("rms_norm_eps", hf.get("rms_norm_eps"), "norm_eps", args.norm_eps),
    ]
    diffs = [
        f"{hf_name}={theirs} but model.text.{ours_name}={ours}"
        for hf_name, theirs, ours_name, ours in fields
        if not same_value(theirs, ours)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {root} config.json has " + "; ".join(diffs))
    # model/glm.py implements plain RoPE and SwiGLU only; anything else would load and run, wrongly
    rope_type = rope_setting(hf, "rope_type", None) or (hf.get("rope_scaling") or {}).get("rope_type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"checkpoint {root} config.json uses rope_type={rope_type!r}; model/glm.py only implements 'default'")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"checkpoint {root} config.json has hidden_act={hf['hidden_act']!r}; model/glm.py only implements 'silu'")


def expected_keys(model: AutoGLM) -> dict[str, str]:
    """Checkpoint key -> our parameter name, for every decoder tensor a checkpoint must provide."""
    text = model.text
    last = len(text.segments) - 1
    keys = {
        "model.embed_tokens.weight": "text.embed_tokens.weight",
        "model.norm.weight": f"text.segments.{last}.exit_norm.weight",  # HF's final norm closes the full-depth exit
        "lm_head.weight": "text.lm_head.weight",
    }
    for k, (start, _) in enumerate(text.args.segment_bounds):
        for j, layer in enumerate(text.segments[k].layers):
            for pname, _ in layer.named_parameters():
                keys[f"model.layers.{start + j}.{pname}"] = f"text.segments.{k}.layers.{j}.{pname}"
    return keys


@torch.no_grad()
def load_glm_checkpoint(model: AutoGLM, directory: str | Path) -> set[str]:
    """Copy the checkpoint's decoder tensors into `model`; return the names of our parameters it set."""
    config_path, shards = checkpoint_files(directory)
    root = config_path.parent
    hf = json.loads(config_path.read_text())
    args = model.cfg.text
    check_config(root, hf, args)

    expected = expected_keys(model)
    params = dict(model.named_parameters())

    found: set[str] = set()  # checkpoint keys copied
    skipped: list[str] = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                name = expected.get(key)
                if name is None:
                    # a per-layer weight we cannot place means a different layer architecture
                    # (e.g. GLM-4-0414's post_self_attn/post_mlp norms): running without it is wrong
                    if LAYER_KEY.fullmatch(key) and not key.endswith("inv_freq"):
                        raise CheckpointError(f"checkpoint {root} tensor {key} has no counterpart in model/glm.py's decoder layer")
                    skipped.append(key)
                    continue
                target = params[name]
                shape = list(f.get_slice(key).get_shape())
                if shape != list(target.shape):
                    raise CheckpointError(f"checkpoint {root} tensor {key} has shape {shape} but {name} expects {list(target.shape)}")
                target.copy_(f.get_tensor(key))  # copy_ casts to the model's dtype and device
                found.add(key)

    if "lm_head.weight" not in found and hf.get("tie_word_embeddings") and "model.embed_tokens.weight" in found:
        # tied checkpoints store the matrix once; our head is a separate parameter, so copy it
        params["text.lm_head.weight"].copy_(params["text.embed_tokens.weight"])
        found.add("lm_head.weight")

    missing = [key for key in expected if key not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {root} lacks {len(missing)} required decoder tensors: {shown}")
    if skipped:
        log.warning("checkpoint %s: skipped %d tensors with no counterpart in the model: %s", root, len(skipped), ", ".join(skipped[:5]))
    return {expected[key] for key in found}


@torch.no_grad()
def save_glm_checkpoint(model: AutoGLM, directory: str | Path) -> Path:
    """Write our decoder as a Hugging Face GlmForCausalLM checkpoint (config.json + model.safetensors).

    The inverse of load_glm_checkpoint's name map: the segments' layers become HF's flat
    `model.layers.{i}`, the full-depth exit's norm becomes `model.norm`. The other exits' norms, the
    encoders and the cross-attention have no place in a GLM checkpoint and are left out, so the
    checkpoint is the full-depth text model. Tensors keep the model's dtype; config.json carries
    the RoPE settings both nested (transformers 5) and at the top level (4.x).
    """
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    # one host copy per tensor: safetensors writes from CPU memory
    tensors = {key: params[name].detach().to("cpu").contiguous() for key, name in expected_keys(model).items()}
    args = model.cfg.text
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": args.rope_theta, "partial_rotary_factor": args.partial_rotary_factor}
    config = {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "attention_bias": args.attention_bias,
        "hidden_act": "silu",
        "tie_word_embeddings": False,  # our LM head is a parameter of its own
        "rope_parameters": rope,
        "rope_theta": args.rope_theta,
        "partial_rotary_factor": args.partial_rotary_factor,
        "pad_token_id": None,  # GlmConfig's default id may lie outside a small vocabulary
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return root
