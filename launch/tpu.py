"""TPU VMs and pod slices with gcloud: create (queued resources), install, run everywhere, stop, delete, and
the c-BTX branch phase as parallel jobs on separate slices. `--dry-run` prints the exact commands.

    python launch/tpu.py create  --name=v13 --zone=us-central2-b --type=v4-128 [--spot] [--project=P]
    python launch/tpu.py wait    --name=v13 --zone=us-central2-b          # until ACTIVE; fails on FAILED etc.
    python launch/tpu.py install --name=v13 --zone=us-central2-b --repo=https://github.com/ORG/voltron \\
        --rev=COMMIT                                 # the same checkout and venv on every worker
    python launch/tpu.py run     --name=v13 --zone=us-central2-b [--detach] -- \\
        python -m voltron_jax.main --multihost --config=configs/voltron_13b.py:v4 --workdir=gs://B/v13 \\
        --compilation_cache=gs://B/xla_cache
    python launch/tpu.py stop    --name=v13 --zone=us-central2-b          # SIGTERM: checkpoint, exit; waits
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

`wait` ends with status 0 once the queued resource is ACTIVE and with status 1 and one line as soon as it
is FAILED, SUSPENDED, SUSPENDING or DELETING (or cannot be described), or after `--timeout` seconds.
`install` needs Python >= 3.11 (setup.py); the TPU VM images are Ubuntu 22.04 with Python 3.10, so when
`python3.11` is missing it is installed from the deadsnakes PPA (apt) first, and a venv made by another
Python is rebuilt. `stop` matches the processes with `pkill -f '[v]oltron_jax[.]main'`: the brackets keep
the remote shell, whose own command line holds the pattern, from matching (and signalling) itself.
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
# Queued-resource states after which a slice never becomes ACTIVE without a new `create`.
TERMINAL = ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING")
# The training processes, as a regex whose text does not match itself (see the module docstring).
TRAIN_PATTERN = "[v]oltron_jax[.]main"


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
    """Poll the queued resource until ACTIVE; fail at once on a terminal state, an unknown resource or
    after --timeout seconds (0: no limit)."""
    if a.poll <= 0:
        raise LaunchError(f"--poll={a.poll}: give the seconds between two state queries (> 0, e.g. 30).")
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
    name, zone = shlex.quote(a.name), shlex.quote(a.zone)
    fix = (
        f"see: gcloud compute tpus queued-resources describe {name} --zone={zone}; delete it and create again"
    )
    loop = (
        "while true; do "
        f's=$({describe}) || {{ echo "error: cannot describe queued resource {name} in {zone}; check --name, '
        '--zone and --project" >&2; exit 1; }; '
        'case "$s" in '
        f'ACTIVE) echo "{name} is ACTIVE"; exit 0;; '
        f"{'|'.join(TERMINAL)}) "
        f'echo "error: queued resource {name} is $s and will not become ACTIVE; {fix}" >&2; exit 1;; '
        "esac; "
        f'if [ {int(a.timeout)} -gt 0 ] && [ "$SECONDS" -ge {int(a.timeout)} ]; then '
        f'echo "error: {name} is still $s after {int(a.timeout)} s; rerun wait or check the quota" >&2; '
        "exit 1; fi; "
        f'echo "waiting for {name} ($s)..."; sleep {a.poll:g}; '
        "done"
    )
    return [["bash", "-c", loop]]


def python_setup(python: str) -> list[str]:
    """Shell steps that make `python` (e.g. python3.11) exist: the TPU VM images ship Ubuntu 22.04 with
    Python 3.10 only, so it comes from the deadsnakes PPA (with its venv module) when missing."""
    if not re.fullmatch(r"python3\.\d+", python):
        raise LaunchError(f"--python={python!r}: give an interpreter name like python3.11 (>= 3.11, < 3.13).")
    apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get"
    return [
        f"(command -v {python} >/dev/null || (sudo add-apt-repository -y ppa:deadsnakes/ppa "
        f"&& {apt} update -q && {apt} install -y -q {python} {python}-venv))",
    ]


def install_script(repo: str, rev: str, extras: str, python: str = "python3.11") -> str:
    """Shell run on every worker: Python >= 3.11, the same commit and a venv with the pinned stack."""
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
            *python_setup(python),
            # a venv of another Python (an older install with python3) is rebuilt with the right one
            f"(.venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null "
            f"|| (rm -rf .venv && {python} -m venv .venv))",
            ".venv/bin/pip install --quiet --upgrade pip",
            f".venv/bin/pip install --quiet -c constraints.txt -e {shlex.quote('.[' + extras + ']')}",
        ]
    )


def install(a) -> list[list[str]]:
    """The same commit and a Python >= 3.11 venv with the pinned stack on every worker."""
    return [ssh_all(a.name, a.zone, install_script(a.repo, a.rev, a.extras, a.python), a.project)]


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
    """The command after `--` on every worker, from the checkout, with its venv on PATH."""
    return [ssh_all(a.name, a.zone, worker_command(a.command, a.detach, a.env), a.project)]


def stop_script(timeout: int, pattern: str = TRAIN_PATTERN) -> str:
    """SIGTERM the processes matching `pattern` on this worker, then wait up to `timeout` s for their exit."""
    pat = shlex.quote(pattern)
    return (
        f"pkill -TERM -f {pat} || true; "
        f"for i in $(seq {max(int(timeout) // 5, 1)}); do "
        f"pgrep -f {pat} >/dev/null || exit 0; sleep 5; done; "
        f'echo "error: $(hostname): voltron_jax.main still runs {int(timeout)} s after SIGTERM" >&2; exit 1'
    )


def stop(a) -> list[list[str]]:
    """SIGTERM the training processes on every worker: voltron_jax saves a checkpoint at a step all hosts
    agree on and exits; rerunning the same command resumes. Returns once they have exited."""
    return [ssh_all(a.name, a.zone, stop_script(a.timeout), a.project)]


def delete(a) -> list[list[str]]:
    """Delete the queued resource and its slice."""
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
    if not a.command:  # checked before the flags are appended (or a slice rented)
        raise LaunchError(
            "branches needs the training command after `--`, e.g. -- python -m voltron_jax.main "
            "--config=configs/recipe_tiny.py --workdir=gs://bucket/run"
        )
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
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__, formatter_class=raw)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, fn in COMMANDS.items():
        doc = " ".join((fn.__doc__ or name).split())
        s = sub.add_parser(name, help=doc.split(". ")[0], description=doc, formatter_class=raw)
        s.add_argument("--name", required=True, help="queued resource / node name (prefix for branches)")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default="")
        if name in ("create", "branches"):
            s.add_argument("--type", default="", help="accelerator type, e.g. v4-128, v5p-128, v5litepod-256")
            s.add_argument("--version", default="", help="runtime version (default per TPU generation)")
            s.add_argument("--spot", action="store_true")
            s.add_argument("--reserved", action="store_true")
        if name in ("wait", "branches"):
            s.add_argument(
                "--timeout", type=int, default=0, help="give up after this many seconds (0: never)"
            )
            s.add_argument("--poll", type=float, default=30, help="seconds between two state queries (> 0)")
        if name == "stop":
            s.add_argument(
                "--timeout", type=int, default=600, help="seconds to wait for the processes to exit"
            )
        if name in ("install", "branches"):
            s.add_argument(
                "--python", default="python3.11", help="interpreter of the venv (installed if missing)"
            )
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
            rc = subprocess.run(cmd).returncode
            if rc:  # the command printed why; the later steps depend on this one
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
