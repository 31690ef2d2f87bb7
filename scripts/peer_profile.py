"""ONNX Runtime's profiler on ORT GenAI's graph: the peer's model.onnx, as its model builder wrote it.

The same phases and summary as `scripts/decode_profile.py --ort-profile` gives our engines
(bench/ort_profile.py), through a plain onnxruntime InferenceSession with the session settings
ORT GenAI gives it (the builder's genai_config.json sets no provider option but CUDA graphs, which
would hide the nodes from the profiler): a warm-up, a prefill of --prompt tokens the first time this
length is seen, the same prefill again, then --steps decode steps at batch 1 after it. The KV
buffers are shared between past and present, as ORT GenAI binds them, --capacity positions long;
a decode step's attention mask is --capacity long, zeros past the sequence, as ORT GenAI's is with
CUDA graphs (so total_sequence_length is the capacity, as in our decode steps).

    python3 scripts/peer_profile.py PEER_MODEL_DIR --out DIR [--beside DIR/ours.json]

PEER_MODEL_DIR holds genai_config.json and model.onnx (`python -m onnxruntime_genai.models.builder
-i CKPT -o PEER_MODEL_DIR -p fp16 -e cuda`, see bench/peer.py). Writes DIR/peer-<layers>.json and
.md, the traces in DIR/traces, and with --beside the two side by side in DIR/beside-<layers>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench import ort_profile

ONNX_TO_TORCH = {"tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(float)": torch.float32,
                 "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}
NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float16: np.float16}


class PeerModel:
    """ORT GenAI's decoder graph in a profiling InferenceSession, with its KV buffers shared in place."""

    def __init__(self, model_dir: Path, device: str, capacity: int, profile_dir: Path):
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.layers, self.vocab = decoder["num_hidden_layers"], config["vocab_size"]
        self.names = {**decoder["inputs"], **decoder["outputs"]}
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "model")
        if self.device.type == "cuda":  # one stream with torch's, as ORT GenAI gives the session its own
            index = self.device.index or 0
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(torch.cuda.current_stream(self.device).cuda_stream)})]
        else:
            options.intra_op_num_threads = int(os.environ.get("DYNGRAPH_CPU_THREADS", "0"))
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_dir / decoder["filename"]), options, providers=providers)
        self.types = {t.name: ONNX_TO_TORCH[t.type] for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        kv_dtype = self.types[self.names["past_key_names"] % 0]
        shape = (1, decoder["num_key_value_heads"], capacity, decoder["head_size"])  # [B, Hkv, capacity, hd]
        self.kv = {name % i: torch.zeros(shape, dtype=kv_dtype, device=self.device)
                   for i in range(self.layers) for name in (self.names["past_key_names"], self.names["past_value_names"])}
        self.capacity = capacity
        self.length = 0  # positions the KV buffers hold

    def bind(self, binding, bind, name: str, t: torch.Tensor) -> None:
        bind(name, self.device.type, self.device.index or 0, NUMPY[t.dtype], tuple(t.shape), t.data_ptr())

    def run(self, ids: list[int], past: int) -> int:
        """The ids after `past` positions (a prompt: past 0; a decode step: one id); the greedy next id."""
        total = past + len(ids)
        ids_t = torch.tensor([ids], dtype=self.types[self.names["input_ids"]], device=self.device)  # [1, S]
        width = total if len(ids) > 1 else self.capacity  # a decode step's mask is the capacity long, as with CUDA graphs
        mask = torch.zeros((1, width), dtype=self.types[self.names["attention_mask"]], device=self.device)
        mask[:, :total] = 1
        logits = torch.empty((1, len(ids), self.vocab), dtype=self.types[self.names["logits"]], device=self.device)  # [1, S, V]
        binding = self.session.io_binding()
        self.bind(binding, binding.bind_input, self.names["input_ids"], ids_t)
        self.bind(binding, binding.bind_input, self.names["attention_mask"], mask)
        self.bind(binding, binding.bind_output, self.names["logits"], logits)
        for i in range(self.layers):
            for past_name, present_name in (("past_key_names", "present_key_names"), ("past_value_names", "present_value_names")):
                buffer = self.kv[self.names[past_name] % i]
                self.bind(binding, binding.bind_input, self.names[past_name] % i, buffer)
                self.bind(binding, binding.bind_output, self.names[present_name] % i, buffer)  # in place, as ORT GenAI shares them
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the inputs are written before the session reads them
        self.session.run_with_iobinding(binding)
        self.length = total
        return int(logits[0, -1].argmax())  # the new id on the host, as a server needs it

    def kv_dtype(self) -> torch.dtype:
        return next(iter(self.kv.values())).dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="decode steps in the profiled phase")
    parser.add_argument("--capacity", type=int, default=2048, help="KV positions (our decode_profile's default)")
    parser.add_argument("--beside", type=Path, help="our engines' summary (decode_profile.py --ort-profile DIR: DIR/ours.json)")
    args = parser.parse_args()
    if not (args.model_dir / "genai_config.json").is_file():
        print(f"{args.model_dir} holds no genai_config.json: give the directory ORT GenAI's model builder wrote (-o)", file=sys.stderr)
        return 2
    if args.prompt + args.steps + 8 > args.capacity:
        print(f"--capacity {args.capacity} must hold the prompt ({args.prompt}) and the steps ({args.steps}) with 8 to spare", file=sys.stderr)
        return 2
    traces_dir = args.out / "traces"
    traces_dir.mkdir(parents=True, exist_ok=True)
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        model = PeerModel(args.model_dir, args.device, args.capacity, traces_dir)
        g = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(0, model.vocab, (n,), generator=g).tolist()

        def decode(token: int, steps: int) -> int:
            for _ in range(steps):
                token = model.run([token], model.length)
            return token

        decode(model.run(ids(max(1, args.prompt // 2)), 0), 3)  # warm-up at another length
        phases = ort_profile.Phases(sync, ort_profile.Kernels() if args.device.startswith("cuda") else None)
        with phases(f"prefill_{args.prompt}_first_call", 1, model.layers):
            model.run(ids(args.prompt), 0)  # ONNX Runtime's first run at this sequence length
        with phases(f"prefill_{args.prompt}", 1, model.layers):
            token = model.run(ids(args.prompt), 0)
        token = decode(token, 2)
        with phases(f"decode_exit{model.layers}", args.steps, model.layers):
            decode(token, args.steps)
        traces = [ort_profile.end_profiling("model", model.session)]
    summary = ort_profile.summarise(traces, phases.phases)
    summary |= {"model_dir": str(args.model_dir), "device": args.device, "prompt_tokens": args.prompt, "capacity": args.capacity}
    stem = f"peer-{model.layers}"
    js, md = ort_profile.write(summary, args.out, stem, f"ORT GenAI's graph ({model.layers} layers, {model.kv_dtype()}, {args.device})")
    print(md.read_text())
    written = [js, md]
    if args.beside:
        ours = json.loads(args.beside.read_text())
        pairs = [(f"decode_exit{model.layers}", f"decode_exit{model.layers}"), *((p["name"], p["name"]) for p in ours["phases"]
                                                                                 if p["name"].startswith("prefill") and p["layers"] == model.layers)]
        beside = args.out / f"beside-{model.layers}.md"
        beside.write_text(ort_profile.side_by_side(ours, summary, pairs))
        print(beside.read_text())
        written.append(beside)
    print("written: " + ", ".join(map(str, written)) + f", traces in {traces_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
