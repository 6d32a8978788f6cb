"""Runs inside a replica: the pre-start actions (S2.3) in order, then exec of the start command.

Standalone on purpose: it is bind-mounted into sandboxes and containers at
/opt/modelserve/bootstrap.py and must run on any python3 >= 3.8 with only the standard library;
it imports nothing from the platform.

Usage: python3 bootstrap.py PLAN.json, where the plan is
  {"actions": [{"action": "write_file", "args": {...}, "ref": "name"}, ...],
   "command": ["python3", "-m", "http.server"]   (or ["<one shell string>"] with command_is_shell),
   "command_is_shell": false, "shell": "/bin/bash", "workdir": "/home/work", "no_new_privs": false}

``no_new_privs``: set the kernel's no_new_privs bit (prctl PR_SET_NO_NEW_PRIVS) first, before any
action, so nothing it starts, the server included, gains privileges through a setuid or
file-capability program. The Swarm engine asks for it where the manager's API can not set
``no-new-privileges`` on a service. If it can not be set the start fails (exit 97): a replica
must not run with less confinement than it was promised.

Every line it prints starts with "[prestart]". When an action fails it prints
"[prestart] action N (kind) failed: <reason>" (N counts from 0) and exits with 97, which the
engines turn into the replica's error. Exit 127: the start command could not be executed.

run_command, as Backend.AI runs it: its output is recorded and a non-zero exit does not stop the
start, unless the action says ``check: true``. ``ref`` (Backend.AI's service actions): an action's
result is saved under that name, and later actions' string arguments use it as ``{name}``:
write_tempfile's path; run_command's ``{name[out]}`` / ``{name[err]}`` (its output as it is) or
``{name}`` (its output without the final line break). Only saved names are replaced: other braces
(a JSON body) stay as written. Each replacement is shown in the log, the value hidden when the name
looks like a secret (token, key, password, secret, credential).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading

FAILED = 97  # the engines read this exit code as "a pre-start action failed"
EXEC_FAILED = 127
TEMPFILE_ENV = "BACKEND_TEMPFILE"  # the path of the last write_tempfile, for later actions/the server

_output = threading.Lock()
_REFERENCE = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)(?:\[([A-Za-z0-9_]+)\])?\s*\}")
_SECRET_NAME = re.compile(r"(?i)secret|token|passw|key|credential|auth")
MAX_CAPTURE = 1024 * 1024  # of a run_command's output kept for {ref[out]}


def say(message):
    with _output:
        sys.stdout.write("[prestart] " + message + "\n")
        sys.stdout.flush()


class ActionError(Exception):
    """A failure whose message is the whole reason shown to the user."""


def need(args, name, kinds=(str,)):
    if name not in args:
        raise ActionError("missing argument %r" % name)
    value = args[name]
    if not isinstance(value, kinds):
        raise ActionError("argument %r has the wrong type (%s)" % (name, type(value).__name__))
    return value


def flag(args, name):
    value = args.get(name, False)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def file_mode(value):
    """'644', 644 (the digits, as YAML gives them), '0o644' or '0644' -> 0o644."""
    if value is None:
        value = "644"
    if isinstance(value, bool):
        raise ActionError("mode must be an octal string such as '644', got %r" % (value,))
    text = str(value).strip().lower()
    if text.startswith("0o"):
        text = text[2:]
    if not text or len(text) > 4 or any(ch not in "01234567" for ch in text):
        raise ActionError("mode must be an octal string such as '644', got %r" % (value,))
    return int(text, 8)


def describe(exc):
    if isinstance(exc, ActionError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (": " + str(exc.filename) if exc.filename else "")
    return "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


def write_file(index, args):
    filename = need(args, "filename")
    body = need(args, "body")
    mode = file_mode(args.get("mode"))
    append = flag(args, "append")
    parent = os.path.dirname(filename)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(filename, "a" if append else "w", encoding="utf-8") as handle:
        handle.write(body)
    os.chmod(filename, mode)
    say(
        "action %d (write_file): %s %d bytes to %s (mode %03o)"
        % (index, "appended" if append else "wrote", len(body.encode("utf-8")), filename, mode)
    )


def write_tempfile(index, args):
    body = need(args, "body")
    mode = file_mode(args.get("mode"))
    handle, path = tempfile.mkstemp(suffix=".py")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(body)
    os.chmod(path, mode)
    # The original hands the path back to the service; here later actions and the start command
    # find it in the environment (the last one in BACKEND_TEMPFILE, each in BACKEND_TEMPFILE_<N>).
    os.environ[TEMPFILE_ENV] = path
    os.environ["%s_%d" % (TEMPFILE_ENV, index)] = path
    say("action %d (write_tempfile): wrote %s (mode %03o), exported as $%s" % (index, path, mode, TEMPFILE_ENV))
    return path


def shown(name, value):
    if _SECRET_NAME.search(name):
        return "(hidden: the name looks like a secret)"
    text = value if len(value) <= 200 else value[:199] + "…"
    return json.dumps(text, ensure_ascii=False)


def resolve(index, kind, value, variables):
    """``value`` (a string, or a list of them) with ``{name}`` / ``{name[key]}`` of saved names replaced."""
    if isinstance(value, list):
        return [resolve(index, kind, item, variables) for item in value]
    if not isinstance(value, str) or "{" not in value:
        return value

    def replace(match):
        name, key = match.group(1), match.group(2)
        if name not in variables:
            return match.group(0)
        saved = variables[name]
        if isinstance(saved, dict):
            if key is None:
                result = saved.get("out", "").rstrip("\r\n")
            elif key in saved:
                result = saved[key]
            else:
                raise ActionError("{%s[%s]}: %s has no %r (use out or err)" % (name, key, name, key))
        elif key is not None:
            raise ActionError("{%s[%s]}: %s is a single value; write {%s}" % (name, key, name, name))
        else:
            result = saved
        say("action %d (%s): %s is %s" % (index, kind, match.group(0), shown(name, str(result))))
        return str(result)

    return _REFERENCE.sub(replace, value)


def run_command(index, args):
    command = need(args, "command", (list, tuple))
    if not command or not all(isinstance(part, str) for part in command):
        raise ActionError("argument 'command' must be a non-empty list of strings")
    command = list(command)
    say("action %d (run_command): running %s" % (index, " ".join(command)))
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise ActionError("can not run %s: %s" % (command[0], exc.strerror or exc))

    captured = {"out": [], "err": []}  # type: dict[str, list[str]]
    sizes = {"out": 0, "err": 0}

    # out and err are captured separately and shown as they come (a long pip install stays visible).
    def pump(stream, label):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if sizes[label] < MAX_CAPTURE:
                captured[label].append(line)
                sizes[label] += len(raw)
            say("action %d (run_command) %s: %s" % (index, label, line.rstrip("\r\n")))
        stream.close()

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, "out")),
        threading.Thread(target=pump, args=(proc.stderr, "err")),
    ]
    for reader in readers:
        reader.start()
    code = proc.wait()
    for reader in readers:
        reader.join()
    if code != 0 and flag(args, "check"):
        raise ActionError("%s exited with code %d" % (command[0], code))
    if code != 0:
        say(
            "action %d (run_command): %s exited with code %d; going on (add check: true to its args to stop "
            "the start when it fails)" % (index, command[0], code)
        )
    else:
        say("action %d (run_command): %s exited with code 0" % (index, command[0]))
    return {"out": "".join(captured["out"]), "err": "".join(captured["err"])}


def mkdir(index, args):
    path = need(args, "path")
    os.makedirs(path, exist_ok=True)
    say("action %d (mkdir): %s" % (index, path))


def log(index, args):
    message = need(args, "message")
    say("action %d (log%s): %s" % (index, ", debug" if flag(args, "debug") else "", message))


ACTIONS = {
    "write_file": write_file,
    "write_tempfile": write_tempfile,
    "run_command": run_command,
    "mkdir": mkdir,
    "log": log,
}


def start(plan):
    command = plan.get("command")
    if not command:
        say("setup failed: there is no start command to run")
        sys.exit(FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    if plan.get("command_is_shell"):
        line = command if isinstance(command, str) else " ".join(command)
        shell = plan.get("shell") or "/bin/bash"
        if not os.path.exists(shell):
            say("the shell %s is not installed; running the start command with /bin/sh instead" % shell)
            shell = "/bin/sh"
        argv = [shell, "-c", line]
    else:
        argv = [str(part) for part in command]
    say("starting: %s" % " ".join(argv))
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        say("start command failed: can not execute %s: %s" % (argv[0], exc.strerror or exc))
        sys.exit(EXEC_FAILED)


PR_SET_NO_NEW_PRIVS = 38  # linux/prctl.h


def set_no_new_privs():
    """The no_new_privs bit for this process and everything it execs; inherited, never unset."""
    import ctypes  # only here: the other plans need nothing beyond the standard library's core

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: bootstrap.py PLAN.json\n")
        return 2
    try:
        with open(argv[1], encoding="utf-8") as handle:
            plan = json.load(handle)
        if plan.get("no_new_privs"):
            set_no_new_privs()
        actions = plan.get("actions") or []
        workdir = plan.get("workdir") or "/home/work"
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except Exception as exc:  # a broken plan, workdir or no_new_privs is reported like a failed action
        say("setup failed: %s" % describe(exc))
        return FAILED
    variables = {}  # type: dict[str, object]  # the results saved by ref, for later actions' {name}
    for index, item in enumerate(actions):
        kind = item.get("action") if isinstance(item, dict) else None
        try:
            handler = ACTIONS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ActionError("unknown action %r" % (kind,))
            args = item.get("args") or {}
            if not isinstance(args, dict):
                raise ActionError("args must be a mapping")
            args = {name: resolve(index, kind, value, variables) for name, value in args.items()}
            result = handler(index, args)
            ref = item.get("ref")
            if isinstance(ref, str) and ref:
                variables[ref] = result if result is not None else ""
        except Exception as exc:  # any failure of an action fails the start, naming its index
            say("action %d (%s) failed: %s" % (index, kind, describe(exc)))
            return FAILED
    if plan.get("no_new_privs"):
        say("no_new_privs set: nothing started from here gains privileges")
    if actions:
        say("%d action%s done" % (len(actions), "" if len(actions) == 1 else "s"))
    start(plan)
    return EXEC_FAILED  # not reached: start() execs or exits


if __name__ == "__main__":
    sys.exit(main(sys.argv))
