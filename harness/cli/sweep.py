"""`unimem-bench sweep`: a method over a grid of config values, each point a normal run; its definition is saved as
<out>/sweeps/<name>.yaml, which `sweep --config` re-runs."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Any

from unimem_bench.harness.cli.arguments import add_config_option, flag_values, positive_int
from unimem_bench.harness.cli.run import add_run_arguments, run_request
from unimem_bench.harness.cli.streams import Streams
from unimem_bench.methods import ConfigError

NAME = "sweep"
# How a sweep is executed, not what it is: left out of the saved flags that re-run it.
EXECUTION = ("workers", "backend", "ray_address")
log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    from unimem_bench.harness.sweeps.presets import PRESETS

    parser = sub.add_parser(NAME, help="run a method over a grid of config values, each point a normal run")
    parser.add_argument("--method", "--methods", dest="methods", default=None,
                        help="a method or a comma list (required, here or in --config)")
    parser.add_argument("--preset", choices=list(PRESETS), help="a study of the paper: " + "; ".join(
        f"{name}: {p.description}" for name, p in PRESETS.items()))
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a swept field, e.g. reading.topk=0,4,8 or injection.layers=0-1,[0,2],all (repeatable)")
    parser.add_argument("--zip", action="store_true", help="pair the i-th values of every --vary (default: grid)")
    parser.add_argument("--name", default=None, help="sweep name under <out>/sweeps/ (default: derived)")
    parser.add_argument("--finetune", type=Path, default=None, metavar="RECIPE",
                        help="fine-tune each point with this recipe (recipes/*.yaml) first, then evaluate its export")
    parser.add_argument("--workers", type=positive_int, default=1, help="points run at once (default: 1)")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="local processes, or tasks on Ray (pip install 'unimem-bench[ray]')")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address (`auto`, ray://host:10001); default: start a local instance")
    add_run_arguments(parser)
    add_config_option(parser)
    parser.set_defaults(func=execute, flags_parser=parser)


def execute(args: argparse.Namespace, streams: Streams) -> int:
    from unimem_bench.harness.cli.order import registry_order
    from unimem_bench.harness.reporting.pareto import plot_pareto
    from unimem_bench.harness.reporting.tables import render_rich, sweep_tables
    from unimem_bench.harness.sweeps.execute import run_sweep
    from unimem_bench.harness.sweeps.plan import SweepRequest, plan_sweep
    from unimem_bench.harness.sweeps.presets import parse_vary

    if args.methods is None:
        raise ConfigError("sweep needs --method NAME (on the command line or in --config)")
    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'unimem-bench[ray]' (or drop --backend ray)")
    if args.ray_address and args.backend != "ray":
        raise ConfigError("--ray-address only applies with --backend ray")
    req = SweepRequest(base=run_request(args), axes=tuple(parse_vary(v) for v in args.vary), preset=args.preset,
                       zipped=args.zip, name=args.name, finetune=args.finetune)
    plan = plan_sweep(req)
    flags = flag_values(args, args.flags_parser, skip=EXECUTION)
    try:
        results = run_sweep(plan, streams.err, workers=args.workers, backend=args.backend,
                            ray_address=args.ray_address, argv=args.argv, flags=flags)
    except KeyboardInterrupt:
        log.warning("interrupted: every finished point is kept in %s; run the same command again to resume", args.out)
        return 130
    for table in sweep_tables(args.out, plan.name, registry_order()):
        render_rich(table, streams.out, title=f"Sweep {plan.name}")
    for path in plot_pareto(args.out, args.out / "plots", names=[plan.name], order=registry_order()):
        streams.out.print(f"plot: {path}", highlight=False, soft_wrap=True)
    failed = [r for r in results if r.error]
    if failed:
        log.error("%d point(s) failed; the others are recorded. Re-run to retry them.", len(failed))
        return 1
    return 0
