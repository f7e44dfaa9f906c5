"""Deploy the flows from Python: the same deployments as ``deployments/prefect.yaml``.

Why a second way: ``prefect deploy`` needs the YAML file and the CLI, and (Prefect 3.8) ignores
``--pool`` when it deploys several deployments at once. From code, the pool is an argument and
deployments can be generated (one per archive, say) without templating YAML.

    python deployments/deploy.py --pool imgclust                 # both deployments
    python deployments/deploy.py --pool gpu-pool --name on-demand

Workers load the flow from this checkout (``IMGCLUST_HOME`` overrides the path they see), with the
package installed in their Python. ``tests/test_deployments.py`` checks both ways give the same result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PLACEHOLDERS = {"source": "/path/to/images", "output": "/path/to/output", "n_clusters": 10}
JOB_VARIABLES = {"env": {"PREFECT_LOGGING_EXTRA_LOGGERS": "imgclust", "DO_NOT_TRACK": "1",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}}
DEPLOYMENTS = {
    "on-demand": dict(entrypoint="flows/cluster_archive.py:cluster_archive", parameters={"config": PLACEHOLDERS},
                      tags=["imgclust"], description="Cluster an archive when asked; override `config` with --params."),
    "nightly": dict(entrypoint="flows/assign_new.py:assign_new_flow",
                    parameters={"config": {"run_dir": "/path/to/output", "source": "/path/to/images"}},
                    tags=["imgclust", "scheduled"],
                    description="Every night at 02:00 UTC, add the images new to the archive to an existing run's "
                    "clusters.", schedules=[("0 2 * * *", "UTC")], concurrency_limit=1),
}


CONFIGS = {"on-demand": "RunConfig", "nightly": "AssignConfig"}


def checked_parameters(name: str, config: dict | None) -> dict:
    """The deployment's parameters (``config`` replacing the default one), validated by the flow's
    config class: what a run of it would refuse, deploying refuses too (credentials above all)."""
    import imgclust.config

    params = {"config": {**DEPLOYMENTS[name]["parameters"]["config"], **(config or {})}}
    getattr(imgclust.config, CONFIGS[name])(**params["config"])
    return params


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", default="imgclust", help="process work pool (default: imgclust)")
    p.add_argument("--name", action="append", choices=sorted(DEPLOYMENTS),
                   help="deployment to create or update; repeatable (default: all)")
    p.add_argument("--config", type=json.loads, help="JSON settings merged into each deployment's `config` "
                   "parameter, e.g. '{\"source\": \"s3://b/images\", \"output\": \"s3://b/runs/r1\"}'")
    args = p.parse_args(argv)
    from pydantic import ValidationError

    parameters = {}
    for name in args.name or DEPLOYMENTS:
        try:
            parameters[name] = checked_parameters(name, args.config)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            print(f"deploy: error: {name}: {problems}", file=sys.stderr)
            raise SystemExit(2) from None

    from prefect import deploy
    from prefect.flows import Flow
    from prefect.schedules import Cron

    root = os.environ.get("IMGCLUST_HOME") or str(Path(__file__).resolve().parents[1])
    deployments = []
    for name in args.name or DEPLOYMENTS:
        kw = dict(DEPLOYMENTS[name], parameters=parameters[name])
        flow = Flow.from_source(source=root, entrypoint=kw.pop("entrypoint"))  # pull: set_working_directory(root)
        schedules = [Cron(cron, timezone=tz) for cron, tz in kw.pop("schedules", [])]
        deployments.append(flow.to_deployment(name=name, work_pool_name=args.pool, job_variables=JOB_VARIABLES,
                                              schedules=schedules or None, **kw))
    return deploy(*deployments, work_pool_name=args.pool, build=False, push=False, print_next_steps_message=False)


if __name__ == "__main__":
    main()
