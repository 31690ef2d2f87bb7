"""The entry points as a person meets them, run as subprocesses: a configuration mistake is one line
and exit status 2 before any work starts (unknown keys even with `+`, the schemas that are no
option of their groups, mistyped values, ports), and `--help` is one short page per command."""
from __future__ import annotations

import socket

import pytest

from .conftest import one_error_line, run_cli

TIMEOUT = 120  # a refusal takes seconds; an override that is not refused would start the real work


@pytest.mark.parametrize("command, override, needle", [
    # Hydra appends whatever `+` names; the schema does not have it
    ("pipeline export", "+export.dtyp=fp16", "export.dtyp is not a setting of export (did you mean export.dtype?)"),
    ("pipeline export", "export.dtyp=fp16", "export.dtyp is not a setting of export (did you mean export.dtype?)"),
    ("runtime.serve", "+server.prot=1", "server.prot is not a setting of server (did you mean server.port?)"),
    # the schemas live outside the groups: choosing one would compose ModelConfig's 6.76 B-parameter defaults
    ("pipeline export", "model=model_schema", "model=model_schema is not an option: model is one of phone-9b, reference, reference-cpu, tiny"),
    ("pipeline export", "~model", "model has no option chosen"),
    ("runtime.serve", "runtime=runtime_schema", "runtime=runtime_schema is not an option"),
    ("pipeline bench", "bench=bench_schema", "bench=bench_schema is not an option"),
    # a value its type cannot take (export.dtype=fp17 is the export's to refuse: test_export.py)
    ("pipeline export", "export.max_batch=abc", "export.max_batch=abc"),
])
def test_a_configuration_mistake_is_one_line(command, override, needle, tmp_path):
    result = run_cli(*command.split(), override, f"engines_dir={tmp_path / 'engines'}", timeout=TIMEOUT)
    one_error_line(result, needle)
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("command, port, needle", [
    ("runtime.serve", "99999", "server.port=99999 must lie in 1..65535"),
    ("runtime.serve", "-1", "server.port=-1 must lie in 1..65535"),
    ("runtime.serve", "0", "server.port=0 must lie in 1..65535"),
    ("pipeline bench", "99999", "server.port=99999 must lie in 0..65535 (0: any free port)"),
])
def test_a_port_out_of_range_is_refused_before_start_up(command, port, needle, tmp_path):
    # engines_dir without an export: the port is checked before the engines are looked for
    result = run_cli(*command.split(), f"server.port={port}", f"engines_dir={tmp_path}", timeout=TIMEOUT)
    one_error_line(result, needle)


def test_a_port_in_use_is_refused_before_serving(tiny_engines_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("runtime.serve", f"engines_dir={tiny_engines_dir.parent.parent}", f"server.port={port}", timeout=TIMEOUT)
    line = one_error_line(result, f"cannot listen on 127.0.0.1:{port}")
    assert "serving" not in line and "serving" not in result.stdout


@pytest.mark.parametrize("command, names", [
    ("pipeline export", ["model=tiny|", "export=onnx|", "paths=", "placement=", "+preset=phone-9b-gpu", "engines_dir="]),
    ("pipeline bench", ["bench=default|", "model=", "export=", "paths=", "+preset=", "output_dir=", "server.port=0"]),
    ("pipeline calibrate", ["calibrate=cpu|", "model=", "bench=", "paths=", "calibrate.corpus=DIR"]),
    ("pipeline compare", ["BASE.json", "NEW.json", "--tolerance METRIC=X", "compare.kinds="]),
    ("runtime.serve", ["model=", "export=", "runtime=cpu|", "cluster=local|ray", "server.port=8000", "server.host="]),
])
def test_help_is_one_page_naming_the_commands_groups(command, names):
    result = run_cli(*command.split(), "--help", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 60, result.stdout
    assert lines[0].startswith(f"usage: python -m {command} ")
    for name in names:
        assert any(line.lstrip().startswith(name) for line in lines), f"{name} not in:\n{result.stdout}"
    assert "_schema" not in result.stdout and "schema=" not in result.stdout
    assert f"python -m {command} --cfg job" in result.stdout  # where the whole config is
