"""``modelserve``'s commands: parse the arguments, call the REST API, print the answer."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cli import config, push
from cli.client import ApiError, Client
from cli.output import Output, human_bytes, table


class UsageError(Exception):
    """A command given wrong arguments: the sentence says which and what to give instead."""


Handler = Callable[[argparse.Namespace, Output], int]

COMPARATORS = {
    ">": "GREATER_THAN",
    ">=": "GREATER_THAN_OR_EQUAL",
    "<": "LESS_THAN",
    "<=": "LESS_THAN_OR_EQUAL",
}


def client_of(args: argparse.Namespace) -> Client:
    settings = config.load()
    return Client(settings.url, settings.api_key)


# --- lookups: a folder or a service by id or by name ---------------------------------------------------


def find_folder(client: Client, ref: str) -> dict[str, Any]:
    folders = client.get("folders/")
    matches = [f for f in folders if ref in (f["id"], f["name"])]
    if len(matches) > 1:
        raise UsageError(
            f"Several folders are named {ref!r}; give the id instead ({', '.join(f['id'] for f in matches)})."
        )
    if not matches:
        raise UsageError(f"No folder {ref!r} that this API key can see. `modelserve folder list` shows them.")
    folder: dict[str, Any] = matches[0]
    return folder


def find_service(client: Client, ref: str) -> dict[str, Any]:
    services = client.get("services/")
    matches = [s for s in services if ref in (s["id"], s["name"])]
    if len(matches) > 1:
        raise UsageError(
            f"Several services are named {ref!r}; give the id instead ({', '.join(s['id'] for s in matches)})."
        )
    if not matches:
        raise UsageError(f"No service {ref!r} that this API key can see. `modelserve service list` shows them.")
    service: dict[str, Any] = matches[0]
    return service


def key_values(pairs: Sequence[str] | None, option: str) -> dict[str, str]:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} takes KEY=VALUE, not {pair!r}.")
        values[key] = value
    return values


# --- login -----------------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace, out: Output) -> int:
    client = Client(args.url, args.api_key)
    me = client.get("me/")
    path = config.save(client.url, args.api_key)
    out.result(
        {"url": client.url, "username": me["username"], "config": str(path)},
        f"Logged in to {client.url} as {me['username']} (saved in {path}).",
    )
    return 0


def cmd_whoami(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    me = client.get("me/")
    out.result({**me, "url": client.url}, f"{me['username']} at {client.url}")
    return 0


# --- folders ---------------------------------------------------------------------------------------


def cmd_folder_list(args: argparse.Namespace, out: Output) -> int:
    folders = client_of(args).get("folders/", usage_mode=args.mode)
    out.result(folders, table(folders, ["id", "name", "usage_mode", "owner", "runnable"]))
    return 0


def cmd_folder_create(args: argparse.Namespace, out: Output) -> int:
    body: dict[str, Any] = {"name": args.name, "usage_mode": args.mode}
    if args.project is not None:
        body["project"] = args.project
    folder = client_of(args).call("POST", "folders/", body)
    out.result(folder, f"Created folder {folder['name']} ({folder['id']}).")
    return 0


def cmd_folder_push(args: argparse.Namespace, out: Output) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        raise UsageError(f"{args.directory!r} is not a directory; push takes a local directory and a folder.")
    client = client_of(args)
    folder = find_folder(client, args.folder)
    cache = push.PushCache(client.url, folder["id"])
    plan = push.plan(client, folder["id"], root, cache)
    for name in plan.skipped:
        out.note(f"skipped {name}: not a regular file (links and special files are not pushed)")
    out.note(
        f"{len(plan.upload)} file(s) to upload ({human_bytes(plan.bytes_to_upload)}), "
        f"{len(plan.unchanged)} unchanged, into folder {folder['name']}"
    )
    bar = out.progress_bar(plan.bytes_to_upload)
    try:
        push.push(client, folder["id"], plan, cache, lambda f, n: bar.advance(n, f.path))
    finally:
        bar.close()
    uploaded = [f.path for f in plan.upload]
    out.result(
        {
            "folder": folder["id"],
            "uploaded": uploaded,
            "unchanged": [f.path for f in plan.unchanged],
            "skipped": plan.skipped,
            "bytes": plan.bytes_to_upload,
        },
        "\n".join(
            [*(f"uploaded {p}" for p in uploaded), f"{len(uploaded)} uploaded, {len(plan.unchanged)} unchanged."]
        ),
    )
    return 0


def cmd_folder_validate(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    folder = find_folder(client, args.folder)
    answer = client.get(
        f"folders/{folder['id']}/launcher/", runtime=args.runtime, model_definition_path=args.definition
    )
    problems = answer.get("problems") or []
    lines = []
    for problem in problems:
        where = ":".join(str(problem.get(k)) for k in ("file", "line") if problem.get(k))
        field = problem.get("field") or problem.get("path") or ""
        lines.append(f"{where or folder['name']}: {field + ' ' if field else ''}{problem.get('message', problem)}")
    text = "\n".join(lines) if problems else f"Folder {folder['name']} is valid for the {args.runtime} runtime."
    out.result({"folder": folder["id"], "valid": not problems, **answer}, text)
    return 1 if problems else 0


# --- services --------------------------------------------------------------------------------------


def current_healthy(service: dict[str, Any]) -> int:
    """Healthy replicas of the service's current spec (a modify rolls old ones out one by one)."""
    version = service.get("spec_version")
    return sum(r["status"] == "healthy" and r.get("spec_version") == version for r in service.get("routes") or [])


def summary(service: dict[str, Any]) -> str:
    return f"{service['status']} ({current_healthy(service)}/{service['desired_replicas']} healthy)"


def route_errors(service: dict[str, Any] | None) -> list[str]:
    """The distinct errors of the service's replicas, in route order."""
    errors = [r["error"] for r in (service or {}).get("routes", []) if r.get("error")]
    return list(dict.fromkeys(errors))


def wait_until(
    client: Client,
    service_id: str,
    out: Output,
    timeout: float,
    done: Callable[[dict[str, Any] | None], bool],
    before: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Poll the service until ``done(service)`` (None once it is gone), printing every status change
    and every new replica error as it appears: without them a replica that can not start (no node
    has room, a bad start command) looks like a silent wait. ``before`` is the service as it was
    before the change; the errors it already held are old news and are not printed again."""
    deadline = time.monotonic() + timeout
    last = ""
    said = set(route_errors(before))
    while True:
        try:
            service: dict[str, Any] | None = client.get(f"services/{service_id}/")
        except ApiError as exc:
            if exc.status != 404:
                raise
            service = None
        now = "gone" if service is None else summary(service)
        if now != last:
            out.note(f"status: {now}")
            last = now
        for error in route_errors(service):
            if error not in said:
                out.note(f"replica error: {error}")
                said.add(error)
        if done(service):
            return service
        if time.monotonic() >= deadline:
            errors = route_errors(service)
            hint = f" Replica errors: {'; '.join(errors)}." if errors else ""
            raise ApiError(f"Gave up waiting after {timeout:g} s; the service is {now}.{hint}")
        time.sleep(1.0)


def healthy(service: dict[str, Any] | None) -> bool:
    """Done waiting: every wanted replica of the current spec is healthy. Raises once that can not
    happen: the service is gone, or it stopped retrying after too many failed starts."""
    if service is None:
        raise ApiError("The service is gone (terminated) while waiting for it to be healthy.")
    if service.get("gave_up"):
        errors = "; ".join(e.rstrip(".") for e in route_errors(service)) or "see its event log"
        raise ApiError(
            f"{service['name']} stopped retrying after {service.get('retries')} failed starts in a row: {errors}. "
            f"Fix the cause, then `modelserve service clear-errors {service['name']}` starts it again."
        )
    wanted = service["desired_replicas"]
    if wanted == 0:
        return service["status"] == "READY"
    return service["status"] == "HEALTHY" and current_healthy(service) >= wanted


def show_service(out: Output, service: dict[str, Any], verb: str = "") -> None:
    lines = [
        f"{verb}{service['name']} ({service['id']}): {summary(service)}",
        f"  url: {service['url']}",
    ]
    lines += [
        f"  route {r['id']}: {r['status']}{' - ' + r['error'] if r.get('error') else ''}" for r in service["routes"]
    ]
    out.result(service, "\n".join(lines))


def service_fields(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "folder", None):
        body["folder"] = find_folder(client, args.folder)["id"]
    for name in ("runtime", "replicas", "image", "preset", "project", "resource_group", "model_definition_path"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    if args.env:
        body["environ"] = key_values(args.env, "--env")
    if args.resource:
        body["resources"] = key_values(args.resource, "--resource")
    if args.public is not None:
        body["open_to_public"] = args.public
    return body


def cmd_service_list(args: argparse.Namespace, out: Output) -> int:
    services = client_of(args).get("services/")
    rows = [{**s, "healthy": summary(s)} for s in services]
    out.result(services, table(rows, ["id", "name", "healthy", "url"]))
    return 0


def cmd_service_show(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    show_service(out, client.get(f"services/{find_service(client, args.service)['id']}/"))
    return 0


def cmd_service_create(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    body = {"name": args.name, **service_fields(args, client)}
    service = client.call("POST", "services/", body)
    out.note(f"created {service['name']} ({service['id']}) at {service['url']}")
    if args.wait:
        service = wait_until(client, service["id"], out, args.timeout, healthy)
    show_service(out, service or {}, "" if args.wait else "Created ")
    return 0


def _modify(args: argparse.Namespace, out: Output, body: dict[str, Any]) -> int:
    client = client_of(args)
    target = find_service(client, args.service)
    if not body:
        raise UsageError("Nothing to change: give at least one option (see `modelserve service modify --help`).")
    service = client.call("PATCH", f"services/{target['id']}/", body)
    if args.wait:
        service = wait_until(client, target["id"], out, args.timeout, healthy, before=target)
    show_service(out, service)
    return 0


def cmd_service_clear_errors(args: argparse.Namespace, out: Output) -> int:
    """Clear errors and retry: the failed replicas go, the retry count starts again from 0."""
    client = client_of(args)
    target = find_service(client, args.service)
    service = client.call("POST", f"services/{target['id']}/clear-errors/")
    if args.wait:
        service = wait_until(client, target["id"], out, args.timeout, healthy)
    show_service(out, service, "" if args.wait else "Retrying ")
    return 0


def cmd_service_modify(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    body = service_fields(args, client)
    if args.name is not None:
        body["name"] = args.name
    return _modify(args, out, body)


def cmd_service_scale(args: argparse.Namespace, out: Output) -> int:
    if args.replicas < 0:
        raise UsageError("The number of replicas can not be negative.")
    return _modify(args, out, {"replicas": args.replicas})


def cmd_service_terminate(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    target = find_service(client, args.service)
    service = client.call("DELETE", f"services/{target['id']}/")
    if args.wait:
        wait_until(client, target["id"], out, args.timeout, lambda s: s is None or s["status"] == "DESTROYED")
        out.result({"id": target["id"], "status": "DESTROYED"}, f"Terminated {target['name']}.")
    else:
        out.result(service, f"Terminating {target['name']} ({service['status']}).")
    return 0


def cmd_service_logs(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    service = find_service(client, args.service)
    routes = service["routes"]
    if args.route:
        matches = [r for r in routes if r["id"].startswith(args.route)]
        if len(matches) != 1:
            known = ", ".join(r["id"] for r in routes) or "none"
            raise UsageError(f"No single replica {args.route!r} in {service['name']}; its replicas: {known}.")
        route = matches[0]
    elif routes:
        route = routes[0]
    else:
        raise UsageError(f"{service['name']} has no replica yet, so no log; try again when it has one.")
    path = f"services/{service['id']}/routes/{route['id']}/logs/"
    query: dict[str, Any] = {"tail": args.tail, "member": args.member}
    if args.follow:
        query["follow"] = 1
        for line in client.stream_lines(path, query):
            if out.as_json:
                out.stdout.write(_json_line({"route": route["id"], "line": line}))
            else:
                out.stdout.write(line + "\n")
            out.stdout.flush()
        return 0
    answer = client.get(path, **query)
    out.result(answer, "\n".join(answer["lines"]))
    return 0


def _json_line(data: dict[str, Any]) -> str:
    """``--follow --json``: one JSON document per log line (JSON lines), as they arrive."""
    return json.dumps(data) + "\n"


# --- tokens and rules ------------------------------------------------------------------------------


def cmd_token_list(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    tokens = client.get(f"services/{find_service(client, args.service)['id']}/tokens/")
    out.result(tokens, table(tokens, ["id", "prefix", "created_by", "expires_at", "active"]))
    return 0


def cmd_token_create(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    body = {"expires_at": args.expires_at} if args.expires_at else {}
    token = client.call("POST", f"services/{find_service(client, args.service)['id']}/tokens/", body)
    # The token alone on stdout for people too: TOKEN=$(modelserve token create svc)
    out.result(token, token["token"])
    out.note(f"token {token['id']} expires at {token['expires_at']}; it is shown only this once")
    return 0


def cmd_token_revoke(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    client.call("DELETE", f"services/{find_service(client, args.service)['id']}/tokens/{args.token}/")
    out.result({"id": args.token, "revoked": True}, f"Revoked token {args.token}.")
    return 0


def cmd_rule_list(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    rules = client.get(f"services/{find_service(client, args.service)['id']}/rules/")
    out.result(
        rules, table(rules, ["id", "direction", "source", "metric", "comparator", "threshold", "step", "last_decision"])
    )
    return 0


def cmd_rule_create(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    body: dict[str, Any] = {
        "direction": args.direction,
        "source": args.source,
        "metric": args.metric,
        "comparator": COMPARATORS.get(args.comparator, args.comparator),
        "threshold": args.threshold,
        "step": args.step,
    }
    for name in ("min_replicas", "max_replicas", "cooldown", "aggregation", "window"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.disabled:
        body["enabled"] = False
    rule = client.call("POST", f"services/{find_service(client, args.service)['id']}/rules/", body)
    out.result(rule, f"Created rule {rule['id']}.")
    return 0


def cmd_rule_delete(args: argparse.Namespace, out: Output) -> int:
    client = client_of(args)
    client.call("DELETE", f"services/{find_service(client, args.service)['id']}/rules/{args.rule}/")
    out.result({"id": args.rule, "deleted": True}, f"Deleted rule {args.rule}.")
    return 0


# --- the parser ------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse's, but a usage mistake raises UsageError (printed like every other error, JSON too)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _service_options(parser: argparse.ArgumentParser, create: bool) -> None:
    if create:
        parser.add_argument("--folder", required=True, help="the model folder (name or id)")
    else:
        parser.add_argument("--folder", help="another model folder (name or id)")
        parser.add_argument("--name", help="a new name")
    parser.add_argument("--runtime", help="custom (default), vllm, nim, cmd, ...")
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--image")
    parser.add_argument("--preset", help="a resource preset's name")
    parser.add_argument("--resource", action="append", metavar="SLOT=VALUE", help="e.g. cpu=1, mem=256mb (repeatable)")
    parser.add_argument("--env", action="append", metavar="KEY=VALUE", help="an environment variable (repeatable)")
    parser.add_argument("--resource-group", dest="resource_group")
    parser.add_argument("--model-definition-path", dest="model_definition_path")
    if create:
        parser.add_argument("--project", type=int, help="a project's id (default: your own)")
    public = parser.add_mutually_exclusive_group()
    public.add_argument("--public", dest="public", action="store_true", default=None, help="callable without a token")
    public.add_argument("--private", dest="public", action="store_false", help="callers need a token")
    _wait_options(parser)


def _wait_options(parser: argparse.ArgumentParser, what: str = "healthy") -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait until the service is {what}")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")


def build_parser() -> Parser:
    parser = Parser(
        prog="modelserve",
        description="The modelserve command-line client (REST API). Add --json anywhere for JSON output.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (errors too) for scripts")
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(sub: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command(groups, "login", cmd_login, "check an API key against the web app and save both")
    p.add_argument("--url", required=True, help="the web app, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", required=True, dest="api_key", help="a key from the web app (msk_...)")
    command(groups, "whoami", cmd_whoami, "who the saved API key belongs to")

    folder = groups.add_parser("folder", help="model folders").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = command(folder, "list", cmd_folder_list, "the folders you can see")
    p.add_argument("--mode", choices=["general", "data", "model"])
    p = command(folder, "create", cmd_folder_create, "create a folder")
    p.add_argument("name")
    p.add_argument("--mode", default="model", choices=["general", "data", "model"])
    p.add_argument("--project", type=int)
    p = command(folder, "push", cmd_folder_push, "upload a directory's new and changed files into a folder")
    p.add_argument("directory")
    p.add_argument("folder", help="name or id")
    p = command(folder, "validate", cmd_folder_validate, "check a folder's definition files (exit 1 on problems)")
    p.add_argument("folder", help="name or id")
    p.add_argument("--runtime", default="custom")
    p.add_argument("--definition", help="model definition file, if not the default")

    service = groups.add_parser("service", help="model services").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    command(service, "list", cmd_service_list, "the services you can see")
    p = command(service, "show", cmd_service_show, "one service with its replicas")
    p.add_argument("service", help="name or id")
    p = command(service, "create", cmd_service_create, "create a service")
    p.add_argument("name")
    _service_options(p, create=True)
    p = command(service, "modify", cmd_service_modify, "change a service (a rolling update)")
    p.add_argument("service", help="name or id")
    _service_options(p, create=False)
    p = command(service, "scale", cmd_service_scale, "set the number of replicas")
    p.add_argument("service", help="name or id")
    p.add_argument("replicas", type=int)
    _wait_options(p)
    p = command(service, "clear-errors", cmd_service_clear_errors, "remove failed replicas and start again")
    p.add_argument("service", help="name or id")
    _wait_options(p)
    p = command(service, "terminate", cmd_service_terminate, "stop every replica and remove the service")
    p.add_argument("service", help="name or id")
    _wait_options(p, "gone")
    p = command(service, "logs", cmd_service_logs, "a replica's log (the first replica unless --route)")
    p.add_argument("service", help="name or id")
    p.add_argument("--route", help="the replica's route id (or its beginning)")
    p.add_argument("--member", help="a cluster member: main1 (default), sub1, ...")
    p.add_argument("--tail", type=int, default=200)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they come")

    token = groups.add_parser("token", help="a private service's tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = command(token, "list", cmd_token_list, "a service's tokens")
    p.add_argument("service")
    p = command(token, "create", cmd_token_create, "issue a token (printed once)")
    p.add_argument("service")
    p.add_argument("--expires-at", dest="expires_at", help="ISO 8601 date (default: in 30 days)")
    p = command(token, "revoke", cmd_token_revoke, "revoke a token")
    p.add_argument("service")
    p.add_argument("token", help="the token's id")

    rule = groups.add_parser("rule", help="autoscaling rules").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=Parser
    )
    p = command(rule, "list", cmd_rule_list, "a service's autoscaling rules")
    p.add_argument("service")
    p = command(rule, "create", cmd_rule_create, "add an autoscaling rule")
    p.add_argument("service")
    p.add_argument("--direction", required=True, choices=["out", "in"])
    p.add_argument("--source", required=True, choices=["kernel", "inference", "proxy"])
    p.add_argument("--metric", required=True, help="e.g. cpu_percent, rps, vllm:num_requests_waiting")
    p.add_argument("--comparator", required=True, choices=[*COMPARATORS, *COMPARATORS.values()])
    p.add_argument("--threshold", required=True, type=float)
    p.add_argument("--step", required=True, type=int, help="replicas to add (out) or remove (in, negative)")
    p.add_argument("--min", dest="min_replicas", type=int)
    p.add_argument("--max", dest="max_replicas", type=int)
    p.add_argument("--cooldown", type=int)
    p.add_argument("--aggregation", choices=["avg", "max", "min"])
    p.add_argument("--window", type=int)
    p.add_argument("--disabled", action="store_true")
    p = command(rule, "delete", cmd_rule_delete, "delete a rule")
    p.add_argument("service")
    p.add_argument("rule", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # --json anywhere before a "--", so `modelserve service list --json` works as scripts write it.
    cut = words.index("--") if "--" in words else len(words)
    as_json = "--json" in words[:cut]
    words = [w for i, w in enumerate(words) if not (w == "--json" and i < cut)]
    out = Output(as_json)
    try:
        args = build_parser().parse_args(words)
        handler: Handler = args.handler
        return handler(args, out)
    except (UsageError, config.ConfigError) as exc:
        out.error(str(exc))
        return 2
    except ApiError as exc:
        out.error(exc.message, exc.status)
        return 1
    except KeyboardInterrupt:
        out.error("Interrupted.")
        return 130
    except OSError as exc:
        out.error(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}.")
        return 1
