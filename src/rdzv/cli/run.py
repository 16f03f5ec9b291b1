"""``rdzv run``: launch a multi-process job on this node, torchrun style.

Same option names as ``torchrun`` (both ``--dash-case`` and ``--snake_case`` spellings), each
defaulting to the environment variable ``PET_<OPTION>`` when set (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_RDZV_ENDPOINT``, ...), like torchrun. Backend choice:

* ``--standalone``, or no endpoint and no master address with a single node: this agent hosts
  a TCPStore on 127.0.0.1 (a port the kernel picks and the agent keeps) and runs a one-node
  ``c10d`` rendezvous on it, with a random run id unless ``--rdzv-id`` is given;
* ``--rdzv-endpoint HOST:PORT``: the ``c10d`` backend (unless ``--rdzv-backend`` says
  otherwise);
* ``--master-addr``/``--master-port``: the ``static`` backend with ``--node-rank``.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any

from rdzv.cli.observe import add_observe_arguments, check_observe_host, observe_tokens
from rdzv.errors import RdzvError

__all__ = ["build_config", "register", "worker_command"]

_FLAG_TRUE = ("1", "true", "yes", "y", "t", "on")


def _env(dest: str, default: Any) -> Any:
    return os.environ.get(f"PET_{dest.upper()}", default)


def _env_flag(dest: str) -> bool:
    return os.environ.get(f"PET_{dest.upper()}", "").strip().lower() in _FLAG_TRUE


def _flags(names: tuple[str, ...]) -> tuple[str, list[str]]:
    dest = names[-1].lstrip("-").replace("-", "_")
    flags = list(names)
    if "_" in dest:
        flags.append("--" + dest)
    return dest, flags


def _add(parser: Any, *names: str, default: Any, **kwargs: Any) -> None:
    """An option with torchrun's spellings and a ``PET_<DEST>`` environment default."""
    dest, flags = _flags(names)
    parser.add_argument(*flags, dest=dest, default=_env(dest, default), **kwargs)


def _add_flag(parser: Any, *names: str, help: str) -> None:
    dest, flags = _flags(names)
    parser.add_argument(*flags, dest=dest, action="store_true", default=_env_flag(dest), help=help)


def register(subparsers: Any) -> None:
    """Add the ``run`` sub-command."""
    p = subparsers.add_parser(
        "run",
        help="launch workers on this node under an elastic agent (torchrun-compatible)",
        description="Launch NPROC workers of a script, module or command on this node, "
        "rendezvous with the other nodes, restart on failure. Options as torchrun; each "
        "defaults to $PET_<OPTION>.",
    )
    g = p.add_argument_group("nodes and workers")
    _add(g, "--nnodes", default="1:1", help="number of nodes, N or MIN:MAX (default 1:1)")
    _add(
        g,
        "--nproc-per-node",
        default="1",
        help="workers on this node: an integer, or 'cpu'/'auto' (default 1)",
    )
    _add(g, "--role", default="default", help="the workers' role name (default 'default')")
    g = p.add_argument_group("rendezvous")
    _add(
        g,
        "--rdzv-backend",
        default=None,
        help="rendezvous backend (default: c10d with --rdzv-endpoint, static with "
        "--master-addr, a standalone store for one node)",
    )
    _add(g, "--rdzv-endpoint", default="", help="rendezvous endpoint, usually HOST:PORT")
    _add(g, "--rdzv-id", default="none", help="the job id shared by all nodes")
    _add(
        g,
        "--rdzv-conf",
        default="",
        help="backend options KEY=VALUE,... (e.g. join_timeout=60,last_call_timeout=5)",
    )
    _add_flag(
        g,
        "--standalone",
        help="single node: host the rendezvous store in this agent on a free port, with "
        "a random run id",
    )
    _add(g, "--node-rank", type=int, default=0, help="this node's rank (static backend only)")
    _add(
        g,
        "--master-addr",
        default=None,
        help="address of node 0 (static backend; selects it when no endpoint is given)",
    )
    _add(
        g,
        "--master-port",
        type=int,
        default=None,
        help="port of the store on node 0 (static backend; default 29500)",
    )
    _add(
        g,
        "--local-addr",
        default=None,
        help="this node's address as other nodes should use it (default: its FQDN)",
    )
    g = p.add_argument_group("supervision")
    _add(
        g,
        "--max-restarts",
        type=int,
        default=0,
        help="restarts of the worker group after a failure (default 0)",
    )
    _add(
        g,
        "--hang-timeout",
        type=float,
        default=None,
        help="seconds without rdzv.heartbeat() (after a worker's first) before it is declared "
        "hung: stacks dumped, group restarted or job failed (default off)",
    )
    _add(
        g,
        "--monitor-interval",
        type=float,
        default=0.1,
        help="seconds between checks for waiting nodes and peer heartbeats (default 0.1)",
    )
    _add(
        g,
        "--node-timeout",
        type=float,
        default=30.0,
        help="seconds without a heartbeat after which a peer node is lost and the group "
        "re-rendezvous without it; 0 disables (default 30)",
    )
    _add(
        g,
        "--shutdown-timeout",
        type=float,
        default=float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30)),
        help="seconds between the stop signal and SIGKILL (default 30)",
    )
    _add(
        g,
        "--exit-barrier-timeout",
        type=float,
        default=300.0,
        help="seconds a finished node waits for the others (default 300)",
    )
    _add(
        g,
        "--signals-to-handle",
        default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        help="signals forwarded to the workers before stopping (default "
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT)",
    )
    _add(
        g,
        "--event-log-handler",
        default=None,
        help="events destination: null, console, logging or jsonl:PATH",
    )
    g = p.add_argument_group("output")
    _add(
        g,
        "--log-dir",
        default=None,
        help="base directory of the worker log files (a job directory is created in it)",
    )
    _add(
        g,
        "-r",
        "--redirects",
        default="0",
        help="redirect streams to files: 0 none, 1 stdout, 2 stderr, 3 both, or per local "
        "rank 0:1,1:2",
    )
    _add(g, "-t", "--tee", default="0", help="like --redirects, and also print to the console")
    _add(
        g,
        "--local-ranks-filter",
        default="",
        help="local ranks whose output reaches the console, e.g. 0 or 0,1 (default all)",
    )
    _add(
        g,
        "--log-line-prefix-template",
        default=None,
        help="console prefix of worker lines (${rank}, ${local_rank}, ${role_name}); "
        "default '[${rank}]: '",
    )
    add_observe_arguments(p, "this agent (rounds, restarts, worker exits)")
    g = p.add_argument_group("command")
    _add_flag(g, "-m", "--module", help="run the target as a module (python -m)")
    _add_flag(g, "--no-python", help="run the target as a command, not a Python script")
    p.add_argument("training_script", help="the script, module (-m) or command (--no-python)")
    p.add_argument(
        "training_script_args",
        nargs=argparse.REMAINDER,
        help="arguments passed to every worker (${local_rank} is substituted)",
    )
    p.set_defaults(func=_run)


def worker_command(args: argparse.Namespace) -> list[str]:
    """The worker command line for the parsed arguments (``-u``: unbuffered Python output)."""
    target: str = args.training_script
    rest: list[str] = list(args.training_script_args)
    if args.no_python:
        if args.module:
            raise ValueError("--no-python and -m/--module cannot be combined")
        return [target, *rest]
    if args.module:
        return [sys.executable, "-u", "-m", target, *rest]
    return [sys.executable, "-u", target, *rest]


def _log_dir(path: str | None) -> str | None:
    """``--log-dir``, refused (ValueError naming the flag) when it exists and is not a
    directory, or lies under a file: the workers' logs could not be written there."""
    if path is None:
        return None
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is" if probe == os.path.abspath(path) else f"is under {probe!r}, which is"
        raise ValueError(
            f"--log-dir {path!r} {where} a file, not a directory; give a directory for the "
            "worker logs (created if missing)"
        )
    return path


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`~rdzv.launcher.config.LaunchConfig` for parsed ``rdzv run`` arguments.

    Raises ValueError with a message naming the option for invalid values.
    """
    from rdzv.launcher.config import (
        DEFAULT_LOG_LINE_PREFIX,
        LaunchConfig,
        parse_min_max_nnodes,
        parse_nproc_per_node,
        parse_signals,
        parse_std,
    )
    from rdzv.rendezvous.utils import parse_rendezvous_config

    min_nodes, max_nodes = parse_min_max_nnodes(str(args.nnodes))
    rdzv_configs = parse_rendezvous_config(str(args.rdzv_conf))
    backend: str | None = args.rdzv_backend
    endpoint: str = str(args.rdzv_endpoint).strip()
    run_id: str = str(args.rdzv_id)
    master_port = None if args.master_port is None else int(args.master_port)
    standalone = bool(args.standalone)
    if standalone:
        run_id = str(uuid.uuid4())
    elif backend is None:
        if endpoint:
            backend = "c10d"
        elif args.master_addr is not None or master_port is not None:
            backend = "static"
        elif max_nodes == 1:
            standalone = True  # torchrun also falls back to a local c10d store here
            if run_id == "none":
                run_id = str(uuid.uuid4())
        else:
            raise ValueError(
                f"--nnodes {args.nnodes} needs a rendezvous: give --rdzv-endpoint HOST:PORT "
                "(c10d backend, elastic) or --master-addr/--master-port with --node-rank "
                "(static backend)"
            )
    if backend == "static":
        if not endpoint:
            port = 29500 if master_port is None else master_port
            endpoint = f"{args.master_addr or '127.0.0.1'}:{port}"
        rdzv_configs.setdefault("rank", str(int(args.node_rank)))
    filter_text = str(args.local_ranks_filter).strip()
    try:
        ranks_filter = (
            frozenset(int(r) for r in filter_text.split(",") if r.strip()) if filter_text else None
        )
    except ValueError:
        raise ValueError(
            f"--local-ranks-filter: {filter_text!r} is not a comma-separated list of local ranks"
        ) from None
    return LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=parse_nproc_per_node(str(args.nproc_per_node)),
        run_id=run_id,
        role=str(args.role),
        rdzv_backend=backend or "c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        local_addr=args.local_addr,
        standalone=standalone,
        max_restarts=int(args.max_restarts),
        monitor_interval=float(args.monitor_interval),
        node_timeout=float(args.node_timeout),
        hang_timeout=None if args.hang_timeout is None else float(args.hang_timeout),
        shutdown_timeout=float(args.shutdown_timeout),
        exit_barrier_timeout=float(args.exit_barrier_timeout),
        log_dir=_log_dir(args.log_dir),
        redirects=parse_std(str(args.redirects), "--redirects"),
        tee=parse_std(str(args.tee), "--tee"),
        local_ranks_filter=ranks_filter,
        log_line_prefix_template=args.log_line_prefix_template or DEFAULT_LOG_LINE_PREFIX,
        signals_to_handle=parse_signals(str(args.signals_to_handle)),
        event_log_handler=args.event_log_handler,
    )


def _explain(exc: BaseException) -> str:
    """The message of ``exc`` followed by its causes ("See inner exception" names one)."""
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None and len(parts) < 5:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return "\n  caused by ".join(parts)


def _store_token(rdzv_configs: dict[str, str]) -> bytes | None:
    """The rendezvous store's token (``token_file`` in --rdzv-conf, else $RDZV_TOKEN)."""
    from rdzv.auth import load_token

    return load_token(None, rdzv_configs.get("token_file") or None)


def _run(args: argparse.Namespace) -> int:
    from rdzv.launcher.api import launch
    from rdzv.launcher.proctree import set_child_subreaper

    try:
        config = build_config(args)
        cmd = worker_command(args)
        tokens: list[bytes] = []
        if args.metrics_port is not None:
            tokens = observe_tokens(_store_token(config.rdzv_configs), args.metrics_token_file)
            check_observe_host(args.metrics_host, tokens, insecure=False)
    except (ValueError, RdzvError) as exc:
        print(f"rdzv run: {exc}", file=sys.stderr)
        return 2
    if not args.no_python and not args.module and not os.path.exists(args.training_script):
        print(f"rdzv run: script {args.training_script!r} not found", file=sys.stderr)
        return 2
    set_child_subreaper()
    observed: list[Any] = []

    def observe(agent: Any) -> None:
        from rdzv.observe import serve_agent

        listener = serve_agent(agent, args.metrics_host, args.metrics_port, tokens)
        observed.append(listener)
        agent.status_url = listener.url
        print(f"rdzv run: status page on {listener.url}", file=sys.stderr, flush=True)

    try:
        result = launch(
            config,
            cmd,
            subreaper=True,
            what=args.training_script,
            on_agent=observe if args.metrics_port is not None else None,
        )
    except (ValueError, RdzvError, OSError) as exc:
        print(f"rdzv run: {_explain(exc)}", file=sys.stderr)
        return 1
    finally:
        for listener in observed:
            listener.close()
    if result.summary:
        print(result.summary, file=sys.stderr, flush=True)
    elif result.exit_code != 0 and result.message:
        print(f"rdzv run: {result.message}", file=sys.stderr, flush=True)
    return result.exit_code
