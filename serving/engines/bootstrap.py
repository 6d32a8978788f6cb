"""Runs inside a replica: the pre-start actions (S2.3) in order, then exec of the start command.

Standalone on purpose: it is bind-mounted into sandboxes and containers at
/opt/modelserve/bootstrap.py and must run on any python3 >= 3.8 with only the standard library.
Usage: python3 bootstrap.py PLAN.json  (see serving/prestart.py for the plan's shape).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

FAILED = 97  # the engines read this exit code as "a pre-start action failed"


def say(message):
    sys.stdout.write("[prestart] " + message + "\n")
    sys.stdout.flush()


def mode_of(args):
    return int(str(args.get("mode", "644")), 8)


def run_action(index, action, args):
    if action == "write_file":
        flags = "a" if args.get("append") else "w"
        with open(args["filename"], flags) as handle:
            handle.write(args["body"])
        os.chmod(args["filename"], mode_of(args))
        say("action %d (write_file): wrote %s" % (index, args["filename"]))
    elif action == "write_tempfile":
        fd, path = tempfile.mkstemp(suffix=".py")
        with os.fdopen(fd, "w") as handle:
            handle.write(args["body"])
        os.chmod(path, mode_of(args))
        os.environ["BACKEND_TEMPFILE"] = path
        say("action %d (write_tempfile): wrote %s" % (index, path))
    elif action == "run_command":
        result = subprocess.run(list(args["command"]), capture_output=True, text=True, check=False)
        say("action %d (run_command): %s exited %d" % (index, " ".join(args["command"]), result.returncode))
        for line in result.stdout.splitlines():
            sys.stdout.write("[prestart] out: " + line + "\n")
        for line in result.stderr.splitlines():
            sys.stdout.write("[prestart] err: " + line + "\n")
        sys.stdout.flush()
        if result.returncode != 0:
            raise RuntimeError("the command exited with code %d" % result.returncode)
    elif action == "mkdir":
        os.makedirs(args["path"], exist_ok=True)
        say("action %d (mkdir): %s" % (index, args["path"]))
    elif action == "log":
        prefix = "debug: " if args.get("debug") else ""
        say("action %d (log): %s%s" % (index, prefix, args["message"]))
    else:
        raise RuntimeError("unknown action %r" % action)


def main():
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    workdir = plan.get("workdir") or "/home/work"
    try:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as exc:
        say("can not enter the working directory %s: %s" % (workdir, exc))
    for index, item in enumerate(plan.get("actions") or []):
        try:
            run_action(index, item["action"], item.get("args") or {})
        except Exception as exc:  # any failure of an action fails the start, with its index
            say("action %d (%s) failed: %s" % (index, item.get("action"), exc))
            sys.exit(FAILED)
    command = plan.get("command")
    if not command:
        say("no start command; nothing to run")
        sys.exit(FAILED)
    sys.stdout.flush()
    if plan.get("command_is_shell"):
        shell = plan.get("shell") or "/bin/bash"
        if not os.path.exists(shell):
            fallback = shutil.which("sh") or "/bin/sh"
            say("shell %s not found; using %s" % (shell, fallback))
            shell = fallback
        os.execv(shell, [shell, "-c", command[0]])
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        say("can not start %s: %s" % (command[0], exc))
        sys.exit(FAILED)


if __name__ == "__main__":
    main()
