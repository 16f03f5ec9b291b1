"""Parsers of torchrun's option formats and LaunchConfig validation."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import pytest

from rdzv.cli import build_parser
from rdzv.cli.run import build_config, worker_command
from rdzv.launcher.config import (
    LaunchConfig,
    Std,
    parse_min_max_nnodes,
    parse_nproc_per_node,
    parse_signals,
    parse_std,
    std_for,
)


def test_parse_std_all_and_per_rank() -> None:
    assert parse_std("3") is Std.ALL
    assert parse_std("0") is Std.NONE
    per_rank = parse_std("0:1,1:2")
    assert per_rank == {0: Std.OUT, 1: Std.ERR}
    assert std_for(per_rank, 1) is Std.ERR
    assert std_for(per_rank, 5) is Std.NONE
    assert std_for(Std.OUT, 7) is Std.OUT


@pytest.mark.parametrize("bad", ["4", "x", "0:1,0:2", "a:1", "0:9", "-1", ""])
def test_parse_std_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="--tee"):
        parse_std(bad, "--tee")


def test_parse_nnodes() -> None:
    assert parse_min_max_nnodes("2") == (2, 2)
    assert parse_min_max_nnodes("1:4") == (1, 4)
    for bad in ("0", "3:2", "a", "1:2:3", ""):
        with pytest.raises(ValueError, match="--nnodes"):
            parse_min_max_nnodes(bad)


def test_parse_nproc_per_node() -> None:
    assert parse_nproc_per_node("4") == 4
    assert parse_nproc_per_node("cpu") >= 1
    with pytest.raises(ValueError, match="GPUs"):
        parse_nproc_per_node("gpu")
    with pytest.raises(ValueError):
        parse_nproc_per_node("0")


def test_rdzv_conf_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="'a' must have a value"):
        build_config(_args("--rdzv-conf", "a=", "x.py"))


def test_parse_signals() -> None:
    assert parse_signals("SIGTERM,int, 1") == (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals("SIGKILL")
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signals("SIGNOPE")


def test_launch_config_validation() -> None:
    with pytest.raises(ValueError, match="min_nodes"):
        LaunchConfig(min_nodes=2, max_nodes=1)
    with pytest.raises(ValueError, match="run_id"):
        LaunchConfig(run_id="a/b")
    with pytest.raises(ValueError, match="nproc_per_node"):
        LaunchConfig(nproc_per_node=0)
    assert LaunchConfig(node_timeout=30).node_heartbeat_interval == 1.0
    assert LaunchConfig(node_timeout=3).node_heartbeat_interval == pytest.approx(0.15)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_backend_selection() -> None:
    standalone = build_config(_args("--standalone", "x.py"))
    assert standalone.standalone and standalone.rdzv_backend == "c10d"
    assert standalone.run_id != "none"
    implicit = build_config(_args("--nproc-per-node", "2", "x.py"))
    assert implicit.standalone and implicit.nproc_per_node == 2
    c10d = build_config(_args("--nnodes", "1:2", "--rdzv-endpoint", "h:1", "--rdzv-id", "j", "x"))
    assert (c10d.rdzv_backend, c10d.rdzv_endpoint, c10d.run_id) == ("c10d", "h:1", "j")
    assert (c10d.min_nodes, c10d.max_nodes, c10d.standalone) == (1, 2, False)
    static = build_config(_args("--nnodes", "2", "--master-addr", "h", "--node-rank", "1", "x"))
    assert static.rdzv_backend == "static"
    assert static.rdzv_endpoint == "h:29500"
    assert static.rdzv_configs["rank"] == "1"
    with pytest.raises(ValueError, match="needs a rendezvous"):
        build_config(_args("--nnodes", "2", "x.py"))


def test_options_accept_snake_case_and_pet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _args("--nproc_per_node", "3", "--max_restarts", "2", "-r", "0:1", "x.py", "a", "-b")
    config = build_config(args)
    assert config.nproc_per_node == 3 and config.max_restarts == 2
    assert config.redirects == {0: Std.OUT}
    assert args.training_script_args == ["a", "-b"]
    monkeypatch.setenv("PET_NPROC_PER_NODE", "5")
    monkeypatch.setenv("PET_STANDALONE", "1")
    config = build_config(_args("x.py"))
    assert config.nproc_per_node == 5 and config.standalone


def test_worker_command() -> None:
    import sys

    assert worker_command(_args("s.py", "1")) == [sys.executable, "-u", "s.py", "1"]
    assert worker_command(_args("-m", "pkg.mod")) == [sys.executable, "-u", "-m", "pkg.mod"]
    assert worker_command(_args("--no-python", "echo", "hi")) == ["echo", "hi"]
    with pytest.raises(ValueError, match="cannot be combined"):
        worker_command(_args("--no-python", "-m", "x"))


def test_log_dir_that_is_a_file_names_the_flag(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"--log-dir .* is a file, not a directory"):
        build_config(_args("--log-dir", str(afile), "x.py"))
    with pytest.raises(ValueError, match=r"is under .*afile', which is a file"):
        build_config(_args("--log-dir", str(afile / "sub"), "x.py"))
    assert build_config(_args("--log-dir", str(tmp_path / "new" / "dir"), "x.py")).log_dir
