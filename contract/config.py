"""Typed schemas of the export, bench and calibrate configs (the serve ones are runtime/config.py and serving/config.py).

The YAML files under conf/ fill these in; the entry points register them in Hydra's ConfigStore
(cli/command.py register_configs), so that an override of a field that does not exist, or
of the wrong type, is refused before any work starts. Entry points turn the composed DictConfig
into these dataclasses with OmegaConf.to_object, and library code only sees them: nothing here
imports Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.autoglm import ModelConfig


@dataclass
class TensorRTSettings:
    workspace_gb: float = 8.0  # builder scratch memory limit
    optimization_level: int = 3  # 0..5: higher builds longer for faster kernels
    version_compatible: bool = False  # engines that load on later TensorRT versions
    strongly_typed: bool = True  # take the precisions the ONNX carries
    int8: bool = False
    timing_cache: str = "timing.cache"  # kept beside the engines, reused across builds


@dataclass
class ExportConfig:
    backend: str = "onnx"
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "cpu"  # where the model is built, traced and validated: cpu | cuda
    opset: int = 18
    max_batch: int = 16
    max_seq: int = 512  # new tokens per forward (prompt chunk)
    max_context: int = 2048  # cached tokens
    # validation fails past max|engine - eager| / max|eager| for the export dtype; fp16 measured on
    # phone-9b (H100): ~3e-3 through a 6-layer segment
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "fp16": 3e-2, "bf16": 8e-2})
    # weight-only quantization (exporters/quantize.py): null | int8 | int4. The decoder's and the
    # cross-attention's matrices become ONNX Runtime MatMulNBits (symmetric, `quantize_block` weights
    # per scale); activations, norms, embeddings and encoders keep `dtype`. Engines go to <backend>-<quantize>/
    quantize: str | None = None
    quantize_block: int = 32
    quantize_head: bool = True  # the LM head too: 1.24 of the 4.84 GB a phone-9b fp16 exit-6 step reads (not yet timed against off)
    # a quantized engine is validated against its eager module in `dtype` with this tolerance instead
    # (same measure as `tolerance`): each bound sits above what the scheme's rounding gives on random
    # weights, with room for phone-9b's fp16 segments, the largest error measured (int4's in
    # bench_results/2026-12-02-nvidia-h200-phone-9b-memory/export-int4.log)
    quantize_tolerance: dict[str, float] = field(default_factory=lambda: {"int8": 0.1, "int4": 0.75})
    progress: bool = True
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)


@dataclass
class PathsConfig:
    """conf/paths: where engines are written and read, and where reports go. The top-level
    `engines_dir` and `output_dir` default to these (and a command-line override of either wins)."""

    engines_dir: str = "engines"
    output_dir: str = "reports"  # a run's reports, ignored by git; the ones kept are committed under bench_results/


@dataclass
class EnginesApp:
    """What every command that reads or writes engines has: the paths group and the top-level
    `engines_dir`, which follows the group unless set on the command line (the one declaration of
    that default: conf/*.yaml only choose the paths option)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    engines_dir: str = "${paths.engines_dir}"


@dataclass
class ExportApp(EnginesApp):
    """`python -m pipeline export`; also what the bench and the server need to find an export
    (serving.config.ServeApp and BenchApp extend it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --- python -m pipeline bench / compare ---------------------------------------------------------


@dataclass
class RequestGroup:
    """One kind of request in a workload: `count` requests cycling through `prompts`."""

    count: int = 1
    max_tokens: int = 32
    modalities: list[str] = field(default_factory=lambda: ["text"])  # "text", plus "image" and/or "audio"
    prompts: list[str] = field(default_factory=lambda: ["你是谁?"])
    image_size: int = 448  # side of the synthetic chart in pixels; the server resizes to the encoder's input
    audio_seconds: list[float] = field(default_factory=lambda: [3.0])  # synthetic WAV lengths, cycled
    # prompts: the prompts above | code: a held-out file of bench.corpus cut at a line boundary after one of the prompts
    # (the model continues it) | docstrings: the held-out docstring questions of bench.corpus. Without bench.corpus
    # a code or docstrings group sends nothing (bench/workload.py)
    source: str = "prompts"
    max_prompt_tokens: int = 0  # code: prompt tokens at most (chat template included); 0: the context left after max_tokens


@dataclass
class TransformersBaseline:
    """The text requests through transformers' eager GlmForCausalLM.generate on the same decoder weights."""

    enabled: bool = True
    max_requests: int = 8  # the first N text requests of the workload, one at a time
    attn_implementation: str = "sdpa"  # transformers' default for GLM; "eager" for its pure-python attention
    workdir: str | None = None  # where the temporary GLM checkpoint goes (phone-9b: 17 GB); default the system temp dir


@dataclass
class PeerSettings:
    """ONNX Runtime GenAI (ORT's own LLM runtime) on a random-weight Llama of the same decoder dims,
    built by its model builder and timed at batch 1 (bench/peer.py). Skipped, with the reason,
    where onnxruntime_genai is not installed."""

    enabled: bool = True
    layers: list[int] | None = None  # depths built and timed one at a time; null: the first exit and the full depth
    decode_tokens: int = 128  # greedy tokens after each workload prompt length; the figure is the median step
    cuda_graph: bool = True  # on CUDA, the headline run captures the decode step in ORT's CUDA graphs
    also_without_graph: bool = True  # on CUDA, a second run without them (one more model load per depth)
    workdir: str | None = None  # checkpoint and build (phone-9b at 24 layers: ~16 GB each); default the system temp dir
    checkpoint_dir: str | None = None  # default workdir, or /dev/shm when workdir lacks room for both
    timeout_s: float = 3600.0  # per builder and per timing subprocess


@dataclass
class RooflineSettings:
    enabled: bool = True
    copy_mib: int = 1024  # buffer copied device to device to measure the bandwidth (read + write)
    iters: int = 20


@dataclass
class ThresholdCurve:
    """Quality against latency over confidence thresholds (bench/curve.py): after the modes, one dynamic
    server per point under runtime.policy.name=confidence, and one static server as the reference."""

    thresholds: list[float] = field(default_factory=list)  # top-1 thresholds, each at every exit (runtime.policy.confidence); empty: no curve
    calibrated: bool = True  # and the point of the thresholds calibrated into the engines (runtime.policy.confidence=null), where they have some
    groups: list[str] = field(default_factory=list)  # the workload groups whose requests it sends; empty: every group
    requests: int = 0  # the first N of those requests in send order; 0: all
    max_tokens: int = 0  # at most this many tokens per request (the static reference too); 0: each group's max_tokens
    concurrency: int = 1


@dataclass
class SoakConfig:
    """`pipeline bench bench=soak` (bench/soak.py): `streams` clients, each sending one streaming
    request after another for `duration_s`, drawn from `mix`; the run fails on any 5xx, on any
    answer other than the kind's, or on growth of the server's memory or open files past the tolerances."""

    mode: str = "dynamic"
    streams: int = 8
    duration_s: float = 60.0
    warmup_s: float = 10.0  # the same load before the start sample: encoders loaded, arenas and allocators settled
    max_tokens: int = 24  # of a good request
    # weights: good requests; good ones whose client leaves after disconnect_after chunks; malformed
    # ones (broken JSON, wrong types, lone surrogates, decompression bombs, bad media); ones over the limits below
    mix: dict[str, float] = field(default_factory=lambda: {"good": 0.7, "disconnect": 0.1, "malformed": 0.1, "over_limit": 0.1})
    disconnect_after: int = 3
    # the server runs with these limits (server.<name>=<value>) so that over_limit requests are over them
    limits: dict[str, int] = field(default_factory=lambda: {"max_messages": 16, "max_stop": 4, "max_body_bytes": 1 << 20, "max_images": 1})
    max_rss_growth: float = 0.10  # server RSS, end sample over start sample, as a fraction
    max_gpu_growth: float = 0.05  # NVML's used memory of each GPU, likewise
    max_fd_growth: int = 16  # the server's open file descriptors, end over start
    sample_interval_s: float = 1.0  # RSS and GPU memory polled for the peaks between the samples
    request_timeout_s: float = 300.0


@dataclass
class SpeculationBench:
    """`pipeline bench bench=speculation` (bench/speculation.py): full depth with self-speculation
    against without, through the server, on the workload's text requests at each concurrency level."""

    draft_exits: list[int | None] = field(default_factory=lambda: [None])  # null: the first exit
    draft_tokens: list[int] = field(default_factory=lambda: [2, 4])  # one server per value (runtime.speculation.draft_tokens)
    adaptive: bool = False  # runtime.speculation.adaptive
    # the drafts' engines, one server per entry: null, the served export's; int8/int4, that quantization's export of it
    draft_quantize: list[str | None] = field(default_factory=lambda: [None])
    groups: list[str] = field(default_factory=list)  # the workload's text groups to send; empty: every text group
    requests: int = 8  # per configuration and concurrency level: the groups' requests taken in turn, repeated in order
    max_tokens: int = 64  # every request generates this many (ignore_eos): equal lengths, equal work
    transformers: bool = True  # transformers' assistant_early_exit beside its plain generate, at concurrency 1


@dataclass
class PrefixBench:
    """`pipeline bench bench=prefix` (bench/prefix.py): multi-turn chats that share one long system
    prompt, through a server with runtime.prefix_cache off and one with it on, at each concurrency level."""

    system_tokens: int = 1000  # the system prompt's tokens by the served tokenizer: `intro`, then `tools` in a seeded order, cut there
    intro: str = ""  # the system prompt's first paragraph
    tools: list[str] = field(default_factory=list)  # tool documentation, one entry each
    user_turns: list[str] = field(default_factory=list)  # a chat's turns say consecutive entries from a seeded start of its own
    chats: int = 8  # users, each holding one chat
    turns: int = 3  # user turns per chat; each request carries the earlier turns and the server's answers to them
    max_tokens: int = 32  # greedy tokens per answer at most
    exit_layer: int | None = None  # every request runs at this depth (runtime.policy.force_exit); null: the full depth


@dataclass
class BudgetServers:
    """One quantization's servers in the budget sweep (bench.memory_budget_servers); null: the sweep's own setting."""

    references: list[str] | None = None  # null: bench.memory_budget_references
    budgets_gb: list[float] | None = None  # null: bench.memory_budgets_gb


@dataclass
class BenchConfig:
    name: str = "default"
    seed: int = 0  # the synthetic media and the arrival times derive from it
    groups: dict[str, RequestGroup] = field(default_factory=dict)
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    request_rate: float | None = None  # mean arrivals per second (Poisson); null: each slot sends as soon as it is free
    modes: list[str] = field(default_factory=lambda: ["static", "dynamic"])
    temperature: float = 0.0  # greedy, so that both modes generate comparable lengths
    request_timeout_s: float = 600.0
    sample_interval_s: float = 0.05  # memory sampling period (NVML, server RSS)
    transformers: TransformersBaseline = field(default_factory=TransformersBaseline)
    roofline: RooflineSettings = field(default_factory=RooflineSettings)
    peer: PeerSettings = field(default_factory=PeerSettings)
    soak: SoakConfig | None = None  # set (bench=soak): a soak of one server instead of the static/dynamic comparison
    speculation: SpeculationBench | None = None  # set (bench=speculation): speculative against plain full depth instead
    prefix: PrefixBench | None = None  # set (bench=prefix): the prefix cache off against on, on multi-turn chats, instead
    # weight quantizations to compare (e.g. [null, int8, int4], each its own export): the whole
    # static/dynamic comparison once per entry, then one table of them side by side; empty: export.quantize only
    quantizations: list[str | None] = field(default_factory=list)
    # GPU memory budgets to sweep (runtime.offload.gpu_memory_budget_gb, GiB per device; 0, no limit, is always run
    # as the reference): the dynamic mode with modules on demand at each, per quantization, into one report
    # (bench/budget.py) instead of the static/dynamic comparison; empty: off
    memory_budgets_gb: list[float] = field(default_factory=list)
    # the sweep's reference servers per quantization: static (the static mode) and resident (the dynamic mode with
    # every engine loaded at start, runtime.offload.enabled=false), for the ratios to them
    memory_budget_references: list[str] = field(default_factory=lambda: ["static"])
    # one quantization's servers in place of those two (keys: unquantized, int8, int4): a budget that bites one export
    # holds every engine of a smaller one, or makes a larger one reload engines at every step
    memory_budget_servers: dict[str, BudgetServers] = field(default_factory=dict)
    # the sweep's workload in parts sent one after the other to each server (name -> groups), each warmed up and then
    # run at each level: the first sees a fresh server, so that e.g. a text-only part's peak is its own; empty: one part
    memory_budget_phases: dict[str, list[str]] = field(default_factory=dict)
    # each run of the sweep stops after this many seconds, the requests it did not finish marked cut (a budget that
    # makes every decode step reload engines takes seconds per token); 0: no limit
    memory_budget_run_limit_s: float = 0.0
    # a scripts/build_corpus.py --code folder (heldout/, corpus.json) for a model trained on it, whose checkpoint has the
    # corpus's tokenizer: its held-out part feeds the groups of source code and docstrings; null: those groups send nothing
    corpus: str | None = None
    threshold_curve: ThresholdCurve = field(default_factory=ThresholdCurve)


@dataclass
class ServerLaunch:
    """How the bench starts `python -m runtime.serve` for each mode."""

    runtime: str = "cpu"  # placement group of conf/runtime: cpu | one_gpu | two_gpu
    cluster: str = "local"  # conf/cluster: local (one process) | ray (Ray Serve replicas)
    replicas: int = 1  # with cluster=ray: replicas of the engine chain (cluster.num_replicas)
    port: int = 0  # 0: a free port
    args: list[str] = field(default_factory=list)  # further overrides for runtime.serve, e.g. ["runtime.max_batch_size=16"]
    startup_timeout_s: float = 900.0  # phone-9b's engines take minutes to load


# `python -m pipeline compare`'s allowed change per metric (exact name or glob; the longest matching
# pattern wins): a fraction of the base value, or share points where the report marks the metric
# absolute (exit shares, token agreement, counts). Every metric the bench writes matches one below besides "*"
COMPARE_TOLERANCES = {
    "*": 0.10,
    # exits: the heuristic policy decides from the request alone, so the shares match on any
    # machine; in bench=ci one request of 12 changing depth (0.083) is past it
    "*exit_share*": 0.05,
    # quality: tokens equal to full depth's greedy output, the same on any x86 CPU;
    # 5 points is 5 of bench=ci's 96 tokens, less than one request's 8 going astray
    "*token_agreement": 0.05,
    # work: decode weights read per token and encode weights per request: only a path change moves
    # them (and an export's bytes, slightly, between library versions)
    "*weight_bytes*": 0.01,
    # memory: engine bytes loaded, likewise; peak memory (RSS on a CPU, NVML on a GPU) moves with
    # the allocator, the libraries and the CPU vendor: 15 % lets that through and stops a leak or a
    # buffer too many (bench_results/ has the runs this was set from)
    "*weights_loaded_bytes": 0.01,
    "*peak_memory*": 0.15,
    "*peak_allocated*": 0.15,
    # errors: no request may fail
    "*failed_requests": 0.0,
    # time and energy, within one machine class only: 15 % is two quiet GPU hosts of one kind; a
    # machine shared with other work spreads more: compare timings on a quiet one
    "*_s": 0.15,  # absolute times
    "*per_s": 0.15,  # throughput, copy bandwidth
    "*energy*": 0.15,
    # dynamic/static ratios of times, the speed-up over transformers and over the peer: both sides
    # ran in one session, so what slows the machine evenly cancels, but each side's mean over few
    # requests still moves
    "ratio.*": 0.15,
    # the roofline's fraction: a computed bound over a measured time per token
    "*fraction": 0.15,
}


@dataclass
class CompareConfig:
    """`python -m pipeline compare BASE.json NEW.json`: what to compare and how much change is allowed."""

    base: str = ""
    new: str = ""
    # which metric kinds to compare. Times, throughput, energy and their ratios (kinds time, energy)
    # compare only against a report of the same machine class (environment.machine_class), peak
    # memory only between two GPU runs or two CPU runs; across machine classes they are skipped
    kinds: list[str] = field(default_factory=lambda: ["exits", "work", "quality", "memory", "errors", "time", "energy"])
    tolerances: dict[str, float] = field(default_factory=lambda: dict(COMPARE_TOLERANCES))


@dataclass
class BenchApp(ExportApp):
    bench: BenchConfig = field(default_factory=BenchConfig)
    server: ServerLaunch = field(default_factory=ServerLaunch)
    compare: CompareConfig = field(default_factory=CompareConfig)
    output_dir: str = "${paths.output_dir}"  # reports go to <output_dir>/<date>-<device>-<model>-<backend>/
    run_name: str | None = None  # report folder name; default <date>-<device>-<model>-<backend>
    progress: bool = True


# --- python -m pipeline calibrate ---------------------------------------------------------------


@dataclass
class ExitTraining:
    """calibrate.mode=model (calibrate/train.py): the whole decoder trained for its exits, LayerSkip's
    recipe (Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding").

    Loss per step t: sum over the exits l enabled by the curriculum C(t, l) of w(t, l) * CE_l, every
    exit read through the one shared LM head, w normalised over the enabled exits. The paper's scale
    rule ("sum_l") gives an exit after layer index l (0-based) e(l) = exit_scale * (0 + 1 + ... + l) and
    the last layer L-1 + exit_scale * (0 + ... + L-2): deep exits weigh more. Layer dropout skips layer
    l of a sample with p(l, t) = S(t) * D(l) * layer_dropout, D(l) = 2^(l / (L-1)) - 1 (0 at the
    first layer, 1 at the last) and S(t) = 2^(t / T) - 1 from scratch (rising with time), 1 from a checkpoint.
    The paper tunes these per model: layer_dropout (its p_max) 0.1-0.2, exit_scale 0.05-1, rotational
    or gradual curricula; the defaults below are in those ranges, the reference presets state their own."""

    early_exit_loss: bool = True  # false: full-depth CE only (the baseline the recipe is compared with)
    exit_scale: float = 1.0  # the paper's e_scale, for the sum_l rule above
    exit_weights: list[float] | None = None  # per-exit scales in exit order (full depth last) instead of the rule, e.g. [0.3, 0.3, 0.3, 1.0]
    curriculum: str = "rotational"  # none: every exit every step | rotational: early exit k on steps t with t % rotation == k % rotation | gradual
    rotation: int = 2  # R of the rotational curriculum
    gradual_fraction: float = 0.5  # gradual: the early exits join from the deepest down, the shallowest once this share of training has passed
    layer_dropout: float = 0.1  # p_max: the last layer's rate (times S(t))
    dropout_time_ramp: bool | None = None  # S(t) above; null: on from scratch, off (S = 1) from model.checkpoint
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms and biases
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * this, over max_steps or max_minutes, whichever ends first
    # resumable: the state (weights, AdamW moments, the batch and dropout generators; safetensors +
    # JSON) is written to state_dir (default .<output_dir name>.train-state beside it) every
    # save_every_minutes and when the run stops; the same command picks it up again
    state_dir: str | None = None
    resume: bool = True  # false: start over, discarding a saved state
    save_every_minutes: float = 2.0
    pause_after_steps: int = 0  # > 0: stop after this many steps of this session, keep the state, write nothing else
    eval_batch: int = 16  # held-out windows per evaluation forward
    confidences: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95])  # the report's coverage/agreement table
    draft_tokens: list[int] = field(default_factory=lambda: [2, 4, 6])  # k of the self-speculative draft estimate


@dataclass
class CalibrateConfig:
    """Self-distilled exit heads and calibrated confidence thresholds (calibrate/run.py), or, with
    mode=model, the whole decoder trained for its exits (calibrate/train.py, settings in `train`)."""

    mode: str = "heads"  # heads: exit norms/adapters on a frozen backbone | model: LayerSkip training of the whole decoder
    corpus: str = ""  # a directory of .txt documents and .jsonl chats ({"messages": [...]} per line); nothing is downloaded
    heldout_corpus: str | None = None  # a directory held out as a whole (scripts/build_corpus.py --code's heldout/) instead of heldout_fraction
    # heads: default <model.checkpoint>/exits (found by model.exits=auto), else <engines_dir>/<model>/exits;
    # model: the checkpoint folder written, default <engines_dir>/<model>/checkpoint
    output_dir: str | None = None
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "fp32"  # the frozen backbone's: fp32 | fp16 | bf16; the exit heads always train in float32 (model: bf16 autocast over float32 weights)
    seq_len: int = 256  # tokens per forward
    forward_batch: int = 8  # sequences per forward of the frozen backbone
    heldout_fraction: float = 0.2  # of the corpus's tokens, whole documents, never trained on (unless heldout_corpus is given)
    max_train_tokens: int = 200_000  # their hidden states at every exit are kept on calibrate.device (model: the training stream's length)
    max_heldout_tokens: int = 50_000
    max_heldout_chats: int = 256  # held-out chats run as requests (request view, heuristic fit)
    batch_tokens: int = 2048  # positions per training step
    max_steps: int = 400
    max_minutes: float = 0.0  # wall-clock limit of the training loop; 0: none
    lr: float = 5e-3
    warmup_steps: int = 20
    target_agreement: float = 0.95  # share of exiting tokens whose top-1 must equal full depth's
    min_exit_rate: float = 0.01  # thresholds that fewer held-out positions reach are not tested
    seed: int = 0
    progress: bool = True
    train: ExitTraining = field(default_factory=ExitTraining)


@dataclass
class CalibrateApp(EnginesApp):  # without a checkpoint, the heads go to <engines_dir>/<model>/exits
    model: ModelConfig = field(default_factory=ModelConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)  # the workload whose text requests the report sends through the policy
    tokenizer: str | None = None  # a directory with tokenizer.json; default: model.checkpoint's, else the built-in byte-level one
