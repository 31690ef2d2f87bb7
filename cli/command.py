"""How every entry point is a Hydra app. Hydra stays in cli/: everything below takes typed
dataclasses.

Each command (cli/pipeline.py, cli/serve.py) is a `hydra_command`: Hydra composes its primary config from conf/, the composed
config is checked against its schema and handed over as the typed dataclass, a configuration
mistake ends in one line with exit status 2, and `--help` is the command's own page (`Command`).
"""
from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from contract.config import BenchApp, BenchConfig, CalibrateApp, CalibrateConfig, ExportApp, ExportConfig, PathsConfig
from model.autoglm import ModelConfig
from runtime.config import RuntimeConfig
from serving.config import ClusterConfig, ServeApp

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def register_configs() -> None:
    """Every entry point's typed schemas in Hydra's ConfigStore (on import of this module, which every entry point makes):
    the one place Hydra learns them, so library modules never import Hydra. They live in their own
    `schema` group, which no primary config selects from: each option of a group pulls its schema in
    by path (`- /schema/model@_here_` in conf/model/tiny.yaml), so `model=<a schema>` is no choice
    a user is offered or can make."""
    cs = ConfigStore.instance()
    for name, node in (("model", ModelConfig), ("export", ExportConfig), ("paths", PathsConfig), ("bench", BenchConfig),
                       ("calibrate", CalibrateConfig), ("runtime", RuntimeConfig), ("cluster", ClusterConfig),
                       ("export_app", ExportApp), ("bench_app", BenchApp), ("calibrate_app", CalibrateApp), ("serve_app", ServeApp)):
        cs.store(group="schema", name=name, node=node)


register_configs()


# --- one line per configuration mistake ---------------------------------------------------------


def refuse(message: str) -> NoReturn:
    print(f"[ERROR] {message}", file=sys.stderr)
    sys.exit(2)


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def schema_fields(node: Any) -> list[str] | None:
    """The field names of the dataclass a config node is typed by; None for a plain dict, which
    takes any key (export.tolerance, bench.groups)."""
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return [f.name for f in fields(schema)] if is_dataclass(schema) else None


def not_a_setting(full_key: str, names: list[str]) -> str:
    parent, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else " (--cfg job lists every setting)"
    return f"{full_key} is not a setting{' of ' + parent if parent else ''}{hint}"


def config_error(e: Exception) -> str:
    """Hydra's and OmegaConf's error as one line: Hydra words one over several (the config search
    path, a hint to append with `+`, OmegaConf's block of key and types), and an unknown key gets
    the same line whether Hydra or the schema check found it."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and (names := schema_fields(cause.parent_node)):
        return not_a_setting(cause.full_key, names)
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not an option: {group} is one of {', '.join(e.options)}"
    if isinstance(e, OmegaConfBaseException):
        return f"{e.full_key}: {first_line(e)}" if e.full_key else first_line(e)
    # Hydra's own text up to its search path, then the OmegaConf error under it
    text = str(e).split("Config search path")[0]
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(e, OverrideParseException):
        message = f"{e.override}: {message}"
    return f"{message} ({first_line(cause)})" if cause is not e else message


def unknown_setting(cfg: DictConfig, prefix: str = "") -> str | None:
    """The first key of the composed config that its schema lacks, as the line refusing it: Hydra
    appends whatever `+group.key=value` names, and OmegaConf.to_object would set it as an attribute
    nobody reads. A plain dict takes any key; the values under it are checked against theirs."""
    names = schema_fields(cfg)
    for key, value in cfg.items():
        if names is not None and key not in names:
            return not_a_setting(f"{prefix}{key}", names)
        if isinstance(value, DictConfig):
            if found := unknown_setting(value, f"{prefix}{key}."):
                return found
    return None


def dropped_group(cfg: DictConfig) -> str | None:
    """`~model` composes without the group: its key keeps the schema's defaults, which describe
    no real option (ModelConfig's are a 6.76 B-parameter model). A group is chosen or refused."""
    choices = HydraConfig.get().runtime.choices
    for key in cfg:
        if key not in choices and (Path(CONF_DIR) / str(key)).is_dir():
            return f"{key} has no option chosen (was it removed with ~{key}?): choose one of {', '.join(group_options(str(key)))}"
    return None


# --- --help: the command's own groups and settings ----------------------------------------------


@dataclass(frozen=True)
class Command:
    """One entry point: its primary config in conf/ and what its `--help` says. The groups' options
    and the settings' values are read from conf/ and the composed config, so they cannot go stale."""

    name: str  # as typed: "python -m pipeline export"
    config: str  # conf/<config>.yaml
    summary: str  # what it does, one line
    # group or setting -> one line on what it sets, in the order shown. A group is shown with its
    # options, a setting with its composed value; a name with "=" or "*" in it is shown as written
    lines: dict[str, str]
    presets: tuple[str, ...] = ()  # conf/preset options made for this command
    arguments: dict[str, str] | None = None  # positional arguments and flags of its own, if any
    usage: str = "[GROUP=OPTION ...] [KEY=VALUE ...]"


# the lines of groups and settings that several commands share
SHARED_LINES = {
    "model": "decoder, ViT and audio sizes, exit depths, seed; model.checkpoint=DIR: GLM weights",
    "export": "backend, dtype (fp32|fp16|bf16), device, shape limits, tolerances; quantize=int8|int4",
    "paths": "the defaults of engines_dir and output_dir",
    "placement": "the placement a preset asks for (the server's runtime group follows it)",
    "+preset": "a common GPU run in one override (model, dtype, device, placement, paths)",
    "engines_dir": "the engines are <engines_dir>/<model>/<backend>[-<quantize>]/",
    "tokenizer": "a directory with tokenizer.json; null: the checkpoint's, else the built-in one",
}


def shared(*names: str) -> dict[str, str]:
    return {name: SHARED_LINES[name] for name in names}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def shown_value(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, list):
        return "[" + ", ".join(shown_value(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def help_text(command: Command, overrides: list[str]) -> str:
    """The command's groups, options and main settings, one line each, as composed with the given
    overrides (so `+preset=phone-9b-gpu --help` shows what the preset picks)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=command.config, overrides=overrides, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    groups, settings = [], []
    for name, about in command.lines.items():
        if name == "+preset":
            groups.append((f"+preset={'|'.join(command.presets)}", about))
        elif name in choices:  # the composed option first
            chosen = choices[name]
            groups.append((f"{name}={'|'.join([chosen, *(o for o in group_options(name) if o != chosen)])}", about))
        elif "=" in name or "*" in name:
            settings.append((name, about))
        else:
            settings.append((f"{name}={shown_value(OmegaConf.select(cfg, name))}", about))
    # a left column past 30 characters pushes only its own line's text to the right
    width = min(30, max(len(left) for left, _ in [*groups, *settings, *(command.arguments or {}).items()]))
    out = [f"usage: {command.name} {command.usage}", "", command.summary]
    for title, rows in (("arguments:", list((command.arguments or {}).items())),
                        ("groups, GROUP=OPTION (the first option is the one composed):", groups),
                        ("settings, KEY=VALUE (any field of a group too: GROUP.FIELD=VALUE):", settings)):
        if rows:
            out += ["", title, *(f"  {left:<{width}}  {about}" for left, about in rows)]
    out += ["", f"every setting with its value: {command.name} --cfg job [overrides]",
            f"Hydra's own flags (--cfg, --info, --multirun): {command.name} --hydra-help"]
    return "\n".join(out)


def hydra_command(command: Command) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    """A command's entry point from a task that takes its typed app config (ExportApp, ServeApp...):
    Hydra's main on conf/<command.config>.yaml, with its own `--help`, the composed config checked
    against the schema, and every configuration mistake one line and exit status 2."""

    def decorate(task: Callable[[Any], None]) -> Callable[[], None]:
        user_full_error = os.environ.get("HYDRA_FULL_ERROR")

        def typed_task(cfg: DictConfig) -> None:
            # the task's own errors are Hydra's to report again, and child processes see the user's setting
            os.environ.pop("HYDRA_FULL_ERROR", None)
            if user_full_error is not None:
                os.environ["HYDRA_FULL_ERROR"] = user_full_error
            try:
                if problem := unknown_setting(cfg) or dropped_group(cfg):
                    refuse(problem)
                app = OmegaConf.to_object(cfg)
            except OmegaConfBaseException as e:  # an interpolation that does not resolve
                refuse(config_error(e))
            task(app)

        main = hydra.main(config_path=CONF_DIR, config_name=command.config, version_base=None)(typed_task)

        def run() -> None:
            args = sys.argv[1:]
            # Hydra prints a composition error over several lines and exits 1; with HYDRA_FULL_ERROR=1
            # it raises it instead, and it ends here as one line (unless the user asked for the trace)
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                if "--help" in args or "-h" in args:
                    print(help_text(command, [a for a in args if not a.startswith("-")]))
                    return
                main()
            except (HydraException, OmegaConfBaseException) as e:
                if user_full_error == "1":
                    raise
                refuse(config_error(e))

        return run

    return decorate
