"""`subq submit generate|train|eval|serve ...` and `subq jobs list|logs|stop` (Ray Jobs API, token auth).

    subq submit generate --address http://HEAD:8265 --wait -- --input gsm8k:train --output s3://b/out --actors 2,16
    subq jobs list
    subq jobs logs subq-generate-1a2b3c4d5e --follow
    subq jobs stop subq-generate-1a2b3c4d5e
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

_CTX = {"allow_extra_args": True, "ignore_unknown_options": True}


ADDRESS_HELP = ("Jobs API (dashboard) address (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is "
                "http(s)://, else http://127.0.0.1:8265).")


def _stream(chunk: str) -> None:
    from subq import console

    console.out().write(chunk)
    console.out().flush()


def _submit_command(app: typer.Typer, target: str, module: str) -> None:
    def cmd(
        ctx: typer.Context,
        address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
        key_env: str = typer.Option("OPENAI_API_KEY", "--key-env", help="NAME of the environment variable with "
                                    "the teacher key; its value is shipped out of sight (see cluster/submit.py)."),
        working_dir: Optional[str] = typer.Option(None, "--working-dir", help="Project directory to package "
                                                  "(default: this subq checkout)."),
        exclude: list[str] = typer.Option([], "--exclude", help="Extra gitignore-style excludes for the package."),
        runtime_env: Optional[str] = typer.Option(None, "--runtime-env", help="Extra runtime_env, a YAML/JSON "
                                                  "file or inline JSON (env_vars, pip, image_uri, ...), merged "
                                                  "with subq's (never put the key in it)."),
        submission_id: Optional[str] = typer.Option(None, "--submission-id", "--job-id",
                                                    help="Submission id (default: subq-TARGET-<hex>)."),
        entrypoint_num_cpus: Optional[float] = typer.Option(None, "--entrypoint-num-cpus",
                                                            help="CPUs reserved for the driver."),
        entrypoint_num_gpus: Optional[float] = typer.Option(None, "--entrypoint-num-gpus",
                                                            help="GPUs reserved for the driver."),
        entrypoint_resources: Optional[str] = typer.Option(None, "--entrypoint-resources",
                                                           help='Custom resources reserved for the driver, JSON, '
                                                           'e.g. \'{"generation": 1}\' (the job waits for them).'),
        wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit 1 unless it SUCCEEDED."),
        follow: bool = typer.Option(False, "--follow", help="Stream the job's logs until it ends (as `ray job "
                                    "submit`); exit code 0 only if it SUCCEEDED."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: give up after N seconds."),
    ) -> None:
        from cluster.jobs import Jobs
        from cluster.submit import submit
        from subq import console

        args = [a for a in ctx.args if a != "--"]
        jid = submit(target, args, address=address, key_env=key_env, working_dir=working_dir, excludes=exclude,
                     job_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                     entrypoint_num_gpus=entrypoint_num_gpus, entrypoint_resources=entrypoint_resources,
                     runtime_env=runtime_env)
        console.out().write(jid + "\n")
        console.out().flush()
        if wait or follow:
            jobs = Jobs(address)
            if follow:
                jobs.follow(jid, _stream)
            status = jobs.wait(jid, timeout_s=timeout)
            console.emit_json({"job_id": jid, "status": status})
            if status != "SUCCEEDED":
                console.echo(f"error: job {jid} ended {status} (logs: subq jobs logs {jid})")
                raise typer.Exit(1)

    cmd.__doc__ = (f"Submit `subq {target} ARGS` (python -m {module}) to a Ray cluster as a job. Options for "
                   f"{target} itself go after `--`. Prints the job id.")
    app.command(target, context_settings=_CTX)(cmd)


def register(app: typer.Typer) -> None:
    from cluster.submit import TARGETS

    submit_app = typer.Typer(help="Submit subq jobs to a Ray cluster (Jobs API, token auth, key kept out of "
                             "job metadata).", no_args_is_help=True)
    for target, module in TARGETS.items():
        _submit_command(submit_app, target, module)
    app.add_typer(submit_app, name="submit")

    jobs_app = typer.Typer(help="List, read and stop Ray jobs (token auth as in cluster/auth.py).",
                           no_args_is_help=True)

    addr_opt = typer.Option(None, "--address", help=ADDRESS_HELP)

    @jobs_app.command("list")
    def list_(address: Optional[str] = addr_opt,
              as_json: bool = typer.Option(False, "--json", help="One JSON object per job.")) -> None:
        """List the cluster's jobs: id, status, entrypoint (newest last)."""
        from cluster.jobs import Jobs

        for j in sorted(Jobs(address).list(), key=lambda j: j.start_time or 0):
            row = {"job_id": j.submission_id or j.job_id, "status": str(j.status.value),
                   "entrypoint": j.entrypoint, "message": j.message}
            print(json.dumps(row) if as_json else f"{row['job_id']:<32} {row['status']:<10} {row['entrypoint']}")

    @jobs_app.command("logs")
    def logs(job_id: str = typer.Argument(..., help="Submission id (from `subq submit` or `subq jobs list`)."),
             address: Optional[str] = addr_opt,
             follow: bool = typer.Option(False, "--follow", help="Stream until the job ends.")) -> None:
        """Print a job's driver logs."""
        from cluster.jobs import Jobs

        jobs = Jobs(address)
        if follow:
            jobs.follow(job_id, _stream)
        else:
            sys.stdout.write(jobs.logs(job_id))

    @jobs_app.command("stop")
    def stop(job_id: str = typer.Argument(..., help="Submission id to stop."),
             address: Optional[str] = addr_opt) -> None:
        """Stop a running job (generation keeps every finished row; re-submit to resume)."""
        from cluster.jobs import Jobs

        print(json.dumps({"job_id": job_id, "stop_requested": bool(Jobs(address).stop(job_id))}))

    app.add_typer(jobs_app, name="jobs")
