"""`python -m pipeline {export,calibrate,bench,compare} [overrides]`: the commands and their tasks.

Each command is its own Hydra app with its own primary config in conf/ (export.yaml,
calibrate.yaml, bench.yaml); `python -m pipeline export --help` lists its groups with their options
and its main settings, `python -m pipeline export --cfg job` the whole composed config.
"""
from __future__ import annotations

import logging
import sys
import warnings

from hydra.core.hydra_config import HydraConfig

from cli.command import Command, hydra_command, shared
from contract.config import BenchApp, CalibrateApp, ExportApp

log = logging.getLogger("dyngraph")


def quiet_exporter_logs() -> None:
    # torch.onnx narrates each export step and warns about optional torchvision ops
    warnings.filterwarnings("ignore", module=r"torch\.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


EXPORT = Command(
    "python -m pipeline export", "export",
    "Trace every dynamic path (4 exit depths x 4 modality sets) and the static baseline into validated engines.",
    {**shared("model", "export", "paths", "placement", "+preset", "engines_dir"), "export.progress": "false: no progress bar"},
    presets=("phone-9b-gpu", "reference-gpu"))


@hydra_command(EXPORT)
def export(app: ExportApp) -> None:
    from pipeline.export import ExportError, run_export

    quiet_exporter_logs()
    try:
        run_export(app.model, app.export, app.engines_dir)
    except ExportError as e:
        log.error("export failed: %s", e)
        sys.exit(2)


def server_overrides(app: BenchApp) -> list[str]:
    """The overrides that make runtime.serve pick the engines this bench composed: the same model
    and export choices, any of their fields set on the command line, and the dtype, device and
    checkpoint a preset may have set."""
    hc = HydraConfig.get()
    picked = [f"model={hc.runtime.choices['model']}", f"export={hc.runtime.choices['export']}"]
    given = [o for o in hc.overrides.task if o.lstrip("+~").startswith(("model.", "export."))]
    composed = [f"export.dtype={app.export.dtype}", f"export.device={app.export.device}"]
    if app.model.checkpoint:  # a preset's checkpoint: its weights, tokenizer and exits choose the engines too
        composed.append(f"model.checkpoint={app.model.checkpoint}")
    return picked + composed + given


BENCH = Command(
    "python -m pipeline bench", "bench",
    "The same workload through the real server in static and dynamic mode, on the engines the export wrote "
    "(bench=soak: one server under load; bench=speculation: full depth with and without self-speculation; "
    "bench=prefix: multi-turn chats sharing a system prompt, prefix cache off and on; bench.memory_budgets_gb: a memory-budget sweep).",
    {"bench": "the workload: request groups, concurrency, request rate, baselines; soak; speculation; prefix; quantizations; "
              "memory_budget* (a budget sweep)",
     **shared("model", "export", "paths", "+preset", "engines_dir"),
     "output_dir": "reports go to <output_dir>/<date>-<device>-<model>-<backend>/",
     "run_name": "the report folder's name instead of that",
     "server.runtime": "the conf/runtime group the server runs with: cpu, one_gpu, two_gpu",
     "server.port": "0: any free port",
     "server.*": "cluster, replicas, args (more runtime.serve overrides), startup_timeout_s",
     "progress": "false: no progress bars"},
    presets=("phone-9b-gpu-bench", "phone-9b-gpu-soak", "phone-9b-gpu-budget", "reference-gpu-bench", "reference-cpu-bench"))


@hydra_command(BENCH)
def bench(app: BenchApp) -> None:
    from bench.budget import is_sweep, run_budgets
    from bench.prefix import run_prefix
    from bench.run import BenchError, run_bench
    from bench.server import check_launch
    from bench.soak import run_soak
    from bench.speculation import run_speculation

    # one line per request from httpx, and matplotlib's font cache notice, would bury the progress bar
    for name in ("httpx", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        check_launch(app)
        if is_sweep(app):  # modules on demand under each GPU memory budget, per quantization, beside static and resident
            run_budgets(app, server_overrides(app))
        elif app.bench.soak is not None:  # bench=soak: one server under load for a fixed time
            if app.bench.quantizations:
                raise BenchError("bench=soak soaks one server: set export.quantize to soak a quantized export, not bench.quantizations")
            run_soak(app, server_overrides(app))
        elif app.bench.speculation is not None:  # bench=speculation: full depth with and without self-speculation
            run_speculation(app, server_overrides(app))
        elif app.bench.prefix is not None:  # bench=prefix: multi-turn chats, the prefix cache off and on
            run_prefix(app, server_overrides(app))
        else:  # static against dynamic
            run_bench(app, server_overrides(app))
    except BenchError as e:
        log.error("bench failed: %s", e)
        sys.exit(2)


# what compare's own flags said, parsed before Hydra sees the command line: --tolerance takes
# metric names, whose dots Hydra would read as nesting
COMPARE_CLI: dict = {"tolerances": {}, "error": None}

COMPARE = Command(
    "python -m pipeline compare", "bench",
    "Two bench reports metric by metric: exit 1 on a change past its tolerance, else 0.",
    {"compare.kinds": "the metric kinds compared",
     "compare.tolerances.GLOB=X": "the default tolerances (contract/config.py COMPARE_TOLERANCES); the longest matching glob wins"},
    arguments={"BASE.json": "the report compared against (a bench run's report.json)",
               "NEW.json": "the report checked",
               "--tolerance METRIC=X": "allowed change of a metric (name or glob), a fraction or share points; repeatable"},
    usage="BASE.json NEW.json [--tolerance METRIC=X ...] [KEY=VALUE ...]")


@hydra_command(COMPARE)
def compare_app(app: BenchApp) -> None:
    from bench.compare import CompareError, run_compare

    try:
        if COMPARE_CLI["error"]:
            raise CompareError(COMPARE_CLI["error"])
        code = run_compare(app.compare, COMPARE_CLI["tolerances"])
    except CompareError as e:
        log.error("compare failed: %s", e)
        sys.exit(2)
    sys.exit(code)


def compare() -> None:
    """python -m pipeline compare BASE.json NEW.json [--tolerance METRIC=X ...] [overrides]"""
    files, rest, args = [], [], sys.argv[1:]
    while args:
        arg = args.pop(0)
        if arg == "--tolerance" or arg.startswith("--tolerance="):
            value = arg.partition("=")[2] if arg.startswith("--tolerance=") else (args.pop(0) if args else "")
            name, _, tolerance = value.partition("=")
            try:
                COMPARE_CLI["tolerances"][name] = float(tolerance)
            except ValueError:
                COMPARE_CLI["error"] = f"--tolerance takes METRIC=FRACTION (a metric name or glob), got {value!r}"
        elif "=" not in arg and not arg.startswith("-"):
            files.append(arg)
        else:
            rest.append(arg)
    if files and len(files) != 2:
        COMPARE_CLI["error"] = f"give two reports: python -m pipeline compare BASE.json NEW.json (got {len(files)} paths)"
    # the paths become overrides, quoted so that Hydra takes any character in them literally
    escaped = (f.replace("\\", "\\\\").replace("'", "\\'") for f in files)
    sys.argv[1:] = [f"compare.{key}='{path}'" for key, path in zip(("base", "new"), escaped)] + rest
    compare_app()


CALIBRATE = Command(
    "python -m pipeline calibrate", "calibrate",
    "Train the exits on a local corpus (the heads on a frozen backbone, or the whole decoder) and calibrate the confidence thresholds.",
    {"calibrate.corpus=DIR": "the corpus (required): .txt documents and .jsonl chats; nothing is downloaded",
     "calibrate.mode=heads|model": "heads: exit norms/adapters, backbone frozen; model: LayerSkip training of the whole decoder",
     "calibrate": "device and dtype, token budgets, steps, learning rate, target agreement; calibrate.train.*: the model mode's recipe",
     **shared("model", "+preset"), "bench": "the workload whose text requests the report sends through the policy",
     **shared("paths"), "engines_dir": "without a checkpoint, the heads go to <engines_dir>/<model>/exits",
     "calibrate.output_dir": "where the heads go instead", **shared("tokenizer")},
    presets=("reference-gpu-train", "reference-cpu-train"))


@hydra_command(CALIBRATE)
def calibrate(app: CalibrateApp) -> None:
    from calibrate.run import CalibrateError, run_calibrate
    from calibrate.train import run_train

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        (run_train if app.calibrate.mode == "model" else run_calibrate)(app)
    except CalibrateError as e:
        log.error("calibrate failed: %s", e)
        sys.exit(2)


COMMANDS = {"export": export, "calibrate": calibrate, "bench": bench, "compare": compare}


USAGE = "usage: python -m pipeline {" + ",".join(COMMANDS) + "} [overrides | --help]"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"python -m pipeline {command}"
    COMMANDS[command]()
