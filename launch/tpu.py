"""TPU VMs and pod slices with gcloud: create (queued resources), install, run everywhere, stop, delete, and
the c-BTX branch phase as parallel jobs on separate slices. `--dry-run` prints the exact commands.

    python launch/tpu.py create  --name=v13 --zone=us-central2-b --type=v4-128 [--spot] [--project=P]
    python launch/tpu.py wait    --name=v13 --zone=us-central2-b          # until the slice is ACTIVE
    python launch/tpu.py install --name=v13 --zone=us-central2-b --repo=https://github.com/ORG/voltron \\
        --rev=COMMIT                                 # the same checkout and venv on every worker
    python launch/tpu.py run     --name=v13 --zone=us-central2-b [--detach] -- \\
        python -m voltron_jax.main --multihost --config=configs/voltron_13b.py:v4 --workdir=gs://B/v13 \\
        --compilation_cache=gs://B/xla_cache
    python launch/tpu.py stop    --name=v13 --zone=us-central2-b          # SIGTERM: save a checkpoint, exit
    python launch/tpu.py delete  --name=v13 --zone=us-central2-b
    python launch/tpu.py branches --name=v13b --zone=us-central2-b --type=v4-64 --members=0-7 --create \\
        -- python -m voltron_jax.main --multihost --config=configs/voltron_13b.py:v4 --workdir=gs://B/v13

`run` executes the same command on every worker of the slice (`gcloud ... ssh --worker=all`), from the
checkout `install` made, with its venv first on PATH; `--detach` leaves it running under nohup with the
output in ~/voltron_run.log on each worker. `branches` runs `<command> --only_phase=branch --member=i` on
slice `<name>-i` for each member (each slice is its own jax.distributed cluster; every member writes its
own folder under the shared gs:// workdir). Afterwards run the mix and fine-tune on one big slice:
`run ... -- <command> --only_phase=mix` then `--only_phase=moe_ft` (or the plain command: finished phases
are skipped). docs/pods.md explains the multi-host environment, caches and profiling.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

# Default TPU VM images per generation (gcloud --runtime-version); override with --version.
RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
TYPE_RE = re.compile(r"^(v4|v5p|v5litepod|v6e)-(\d+)$")
CHECKOUT = "voltron_jax"  # folder in each worker's home
LOG = "voltron_run.log"


class LaunchError(ValueError):
    """Bad arguments; the message names the fix."""


def gcloud(*args: str, project: str = "") -> list[str]:
    return ["gcloud", *args, *([f"--project={project}"] if project else [])]


def ssh_all(name: str, zone: str, command: str, project: str = "") -> list[str]:
    """The same shell command on every worker of the slice."""
    return gcloud(
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        name,
        f"--zone={zone}",
        "--worker=all",
        f"--command={command}",
        project=project,
    )


def runtime_version(accel_type: str, version: str) -> str:
    m = TYPE_RE.match(accel_type)
    if not m:
        raise LaunchError(
            f"--type={accel_type!r} is not a TPU accelerator type; use v4-N (TensorCores, e.g. "
            "v4-128), v5p-N (TensorCores, e.g. v5p-128), v5litepod-N (chips) or v6e-N (chips)."
        )
    return version or RUNTIME[m.group(1)]


def create(a) -> list[list[str]]:
    """A queued resource holding one slice (node id = name)."""
    mode = ["--spot"] if a.spot else (["--reserved"] if a.reserved else [])
    return [
        gcloud(
            "compute",
            "tpus",
            "queued-resources",
            "create",
            a.name,
            f"--node-id={a.name}",
            f"--zone={a.zone}",
            f"--accelerator-type={a.type}",
            f"--runtime-version={runtime_version(a.type, a.version)}",
            *mode,
            project=a.project,
        )
    ]


def wait(a) -> list[list[str]]:
    """Poll the queued resource until ACTIVE (gcloud's own --format query inside a shell loop)."""
    describe = shlex.join(
        gcloud(
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            a.name,
            f"--zone={a.zone}",
            "--format=value(state.state)",
            project=a.project,
        )
    )
    loop = f'until [ "$({describe})" = ACTIVE ]; do echo "waiting for {a.name}..."; sleep 30; done'
    return [["bash", "-c", loop]]


def install_script(repo: str, rev: str, extras: str) -> str:
    """Shell run on every worker: the same commit and a venv with the pinned stack (jax + libtpu)."""
    if not repo or not rev:
        raise LaunchError(
            "install needs --repo=<git URL> and --rev=<commit> so every worker gets the same "
            "code (e.g. --rev=$(git rev-parse HEAD))."
        )
    return " && ".join(
        [
            f"(test -d {CHECKOUT} || git clone {shlex.quote(repo)} {CHECKOUT})",
            f"cd {CHECKOUT}",
            "git fetch --quiet origin",
            f"git checkout --quiet {shlex.quote(rev)}",
            "(test -x .venv/bin/python || python3 -m venv .venv)",
            ".venv/bin/pip install --quiet --upgrade pip",
            f".venv/bin/pip install --quiet -c constraints.txt -e {shlex.quote('.[' + extras + ']')}",
        ]
    )


def install(a) -> list[list[str]]:
    return [ssh_all(a.name, a.zone, install_script(a.repo, a.rev, a.extras), a.project)]


def worker_command(command: list[str], detach: bool, env: list[str]) -> str:
    """`command` run from the checkout with its venv on PATH (and KEY=VALUE env), optionally detached."""
    if not command:
        raise LaunchError(
            "give the command to run after `--`, e.g. -- python -m voltron_jax.main --multihost ..."
        )
    for kv in env:
        if "=" not in kv:
            raise LaunchError(f"--env {kv!r} must look like KEY=VALUE.")
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (kv.split("=", 1) for kv in env))
    body = f"cd {CHECKOUT} && export PATH=$PWD/.venv/bin:$PATH && {exports}{shlex.join(command)}"
    if detach:
        return f"nohup bash -c {shlex.quote(body)} > ~/{LOG} 2>&1 &"
    return body


def run(a) -> list[list[str]]:
    return [ssh_all(a.name, a.zone, worker_command(a.command, a.detach, a.env), a.project)]


def stop(a) -> list[list[str]]:
    """SIGTERM the training processes on every worker: voltron_jax saves a checkpoint at a step all hosts
    agree on and exits; rerunning the same command resumes."""
    return [ssh_all(a.name, a.zone, "pkill -TERM -f 'voltron_jax.main' || true", a.project)]


def delete(a) -> list[list[str]]:
    return [
        gcloud(
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            a.name,
            f"--zone={a.zone}",
            "--force",
            "--quiet",
            project=a.project,
        )
    ]


def parse_members(spec: str) -> list[int]:
    """'0-7' or '0,3,5' -> member indices."""
    out = []
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"--members={spec!r}: use a range like 0-7 or a list like 0,3,5.")
        out += list(range(int(lo), int(hi or lo) + 1))
    if not out:
        raise LaunchError("--members is empty; e.g. --members=0-7 for the 8 c-BTX branches.")
    return out


def branches(a) -> list[list[str]]:
    """One slice per fan-out member: optionally create it, then run `<command> --only_phase --member=i`."""
    members = [
        argparse.Namespace(
            **{
                **vars(a),
                "name": f"{a.name}-{i}",
                "detach": True,
                "command": [*a.command, f"--only_phase={a.phase}", f"--member={i}"],
            }
        )
        for i in parse_members(a.members)
    ]
    cmds = [c for m in members for c in create(m)] if a.create else []  # queue every slice first
    for m in members:
        cmds += (wait(m) + install(m) if a.create else []) + run(m)
    return cmds


COMMANDS = {
    "create": create,
    "wait": wait,
    "install": install,
    "run": run,
    "stop": stop,
    "delete": delete,
    "branches": branches,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        s = sub.add_parser(name)
        s.add_argument("--name", required=True, help="queued resource / node name (prefix for branches)")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default="")
        if name in ("create", "branches"):
            s.add_argument("--type", default="", help="accelerator type, e.g. v4-128, v5p-128, v5litepod-256")
            s.add_argument("--version", default="", help="runtime version (default per TPU generation)")
            s.add_argument("--spot", action="store_true")
            s.add_argument("--reserved", action="store_true")
        if name in ("install", "branches"):
            s.add_argument("--repo", default="", help="git URL every worker clones")
            s.add_argument("--rev", default="", help="commit to check out")
            s.add_argument("--extras", default="aot,data", help="pip extras of the package")
        if name in ("run", "branches"):
            s.add_argument("--env", action="append", default=[], help="KEY=VALUE exported first (repeatable)")
            s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
        if name == "run":
            s.add_argument("--detach", action="store_true", help=f"nohup, output in ~/{LOG} on each worker")
        if name == "branches":
            s.add_argument("--members", default="0-7")
            s.add_argument("--phase", default="branch", help="the fan-out phase of the recipe")
            s.add_argument(
                "--create", action="store_true", help="also create, wait for and install each slice"
            )
    return p


def plan(argv: list[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """Parse argv and return the commands it means (nothing runs)."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    dry = "--dry-run" in head  # accepted before or after the subcommand
    argv = [x for x in head if x != "--dry-run"] + argv[len(head) :]
    a = parser().parse_args(argv)
    a.dry_run = dry
    if getattr(a, "command", None) and a.command[0] == "--":
        a.command = a.command[1:]
    if a.cmd == "branches" and a.create and not a.type:
        raise LaunchError("branches --create needs --type (the accelerator type of each slice).")
    if a.cmd == "create" and not a.type:
        raise LaunchError("create needs --type, e.g. --type=v4-128.")
    return a, COMMANDS[a.cmd](a)


def main(argv: list[str]) -> int:
    try:
        a, cmds = plan(argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not a.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
