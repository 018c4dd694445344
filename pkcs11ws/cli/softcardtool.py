"""softcardtool: create, list and delete softcards on the key service (WSOP user guide 5.1).

Uses the module's configuration file (PKCS11WS_CONFIG or the default path) for the server address
and the mutual-TLS files; like the original it does no logging. The passphrase is prompted twice
without echo on a terminal and read from standard input otherwise; it never appears in argv.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from pkcs11ws import __version__, protocol
from pkcs11ws.cli.common import UsageError, err, pipe_safe, read_passphrase
from pkcs11ws.config import DEFAULT_PATH, ENV_CONFIG
from pkcs11ws.errors import ConfigError, InstallationError, PKCS11Error, ServiceError

if TYPE_CHECKING:
    from pkcs11ws.client.api import KeyServiceClient

PROG = "softcardtool"
TOOL_VERSION = "1.1.0"

_OPTIONS = (
    ("-h, --help", f"Display help for '{PROG}'."),
    ("-V, --version", f"Display the version number of '{PROG}'."),
    ("-u, --usage", f"Display a brief usage summary for '{PROG}'."),
    ("-v, --verbose", "verbose output"),
    ("-i, --id=ID", "ID of softcard to delete"),
    ("-n, --name=NAME", "name of softcard to generate"),
    ("-l, --list", "list softcards"),
    ("-d, --delete", "delete softcard by ID"),
    ("-g, --generate", "generate a new softcard"),
)
HELP = (
    f"{PROG}, {TOOL_VERSION}\n\nUsage:\n  {PROG} [options]\n\nOptions:\n\nHelp options:\n"
    + "".join(f"  {opt:<18}{text}\n" for opt, text in _OPTIONS)
    + "\nGenerates softcards and deletes them.\n"
)

USAGE = f"Usage: {PROG} [-hVuvldg] [-i|--id=ID] [-n|--name=NAME]\n"


def parse(argv: list[str]) -> dict[str, object]:
    """GNU-style options as the original takes them (-n NAME, -nNAME, --name=NAME, --name NAME)."""
    opts: dict[str, object] = {"verbose": 0}
    flags = {
        "h": "help",
        "V": "version",
        "u": "usage",
        "l": "list",
        "d": "delete",
        "g": "generate",
        "v": "verbose",
    }
    valued = {"i": "id", "n": "name"}
    longs = {**{v: v for v in flags.values()}, "id": "id", "name": "name"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            key = longs.get(name.lower())
            if key is None:
                raise UsageError(f"unknown option --{name}")
            if key in valued.values():
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"--{name} needs a value")
                    value, i = argv[i], i + 1
                opts[key] = value
            elif key == "verbose":
                opts["verbose"] = int(value) if eq and value.isdigit() else 1
            elif eq:
                raise UsageError(f"--{name} takes no value")
            else:
                opts[key] = True
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                c = arg[j]
                j += 1
                if c in valued:
                    value = arg[j:]
                    if not value:
                        if i >= len(argv):
                            raise UsageError(f"-{c} needs a value")
                        value, i = argv[i], i + 1
                    opts[valued[c]] = value.removeprefix("=")
                    break
                if c == "v":
                    digits = ""
                    while j < len(arg) and arg[j].isdigit():
                        digits, j = digits + arg[j], j + 1
                    opts["verbose"] = int(digits) if digits else 1
                    continue
                if c not in flags:
                    raise UsageError(f"unknown option -{c}")
                opts[flags[c]] = True
        else:
            raise UsageError(f"unexpected argument {arg!r}")
    return opts


@pipe_safe
def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    stdin = stdin or sys.stdin
    try:
        opts = parse(args)
    except (UsageError, ValueError) as e:
        err(PROG, str(e))
        sys.stderr.write(USAGE)
        return 2
    if opts.get("help"):
        sys.stdout.write(HELP)
        return 0
    if opts.get("version"):
        print(f"{PROG}, {TOOL_VERSION} (pkcs11ws {__version__})")
        return 0
    if opts.get("usage"):
        sys.stdout.write(USAGE)
        return 0
    actions = [a for a in ("generate", "list", "delete") if opts.get(a)]
    if len(actions) > 1:
        err(PROG, "choose one of -g, -l, -d")
        return 2
    if not actions and not opts["verbose"]:
        sys.stderr.write(USAGE)
        return 2
    try:
        return _run(actions[0] if actions else "verify", opts, stdin)
    except UsageError as e:
        err(PROG, str(e))
        return 2
    except InstallationError as e:
        err(PROG, e.message)
        return 1
    except ConfigError as e:
        err(
            PROG,
            f"{e.message} (set {ENV_CONFIG} to the configuration file, or create {DEFAULT_PATH})",
        )
        return 1
    except ServiceError as e:
        err(PROG, f"the key service refused: {e.message} ({e.code})")
        return 1
    except PKCS11Error as e:
        err(PROG, e.message)
        return 1


def _run(action: str, opts: dict[str, object], stdin: TextIO) -> int:
    # Imported here so that --help, --version and name checks work without pycurl or a config.
    from pkcs11ws.client.api import KeyServiceClient
    from pkcs11ws.config import load_config

    name = str(opts.get("name") or "")
    card_id = str(opts.get("id") or "")
    if action == "generate" and not protocol.NAME_RE.match(name):
        raise UsageError(
            "a softcard name (--name=NAME) of 1-64 letters and digits is required; "
            f"special characters are not supported (got {name!r})"
        )
    if action == "delete" and not card_id:
        raise UsageError(
            f"the ID of the softcard to delete (--id=ID) is required; `{PROG} -l` lists them"
        )
    cfg = load_config()
    # Read before any request, so a piped passphrase is consumed even when the service fails.
    passphrase = b""
    if action == "generate":
        passphrase = read_passphrase(stdin, "Enter new passphrase: ", "Confirm passphrase: ")
    client = KeyServiceClient(cfg)
    try:
        if opts["verbose"]:
            h = client.health()
            server = f"pkcs11ws-server {h['version']}, protocol {h['protocol']}"
            print(
                f"Connected to key service {client.transport.base_url} ({server}) using {cfg.path}"
            )
        if action == "generate":
            try:
                card = client.create_softcard(name, passphrase)
            except ServiceError as e:
                if e.code == "PASSPHRASE_LEN_RANGE":  # the service's rule (server.yaml)
                    raise UsageError(f"{e.message}; choose a longer passphrase") from None
                raise
            print(f"Softcard generated: ID {card['id']} name {card['name']}")
        elif action == "delete":
            return _delete(client, card_id)
        elif action == "list":
            cards = client.list_softcards()
            print(f"{'ID':36}  {'Name':20} {'Keys':>5} {'Certs':>5} {'Data':>5}")
            for c in cards:
                print(
                    f"{c['id']:36}  {c['name']:20} {c['keys']:>5} {c['certificates']:>5} "
                    f"{c['data']:>5}"
                )
            print(f"{len(cards)} softcard(s)")
        return 0
    finally:
        client.close()


def _delete(client: KeyServiceClient, card_id: str) -> int:
    try:
        client.delete_softcard(card_id)
    except ServiceError as e:
        if e.code == "SOFTCARD_NOT_EMPTY":
            err(
                PROG,
                f"softcard {card_id} still holds keys; remove all keys associated with "
                "the softcard first",
            )
            return 1
        if e.code == "SOFTCARD_NOT_FOUND":
            err(PROG, f"no softcard has the ID {card_id}; `{PROG} -l` lists them")
            return 1
        raise
    print(f"Softcard deleted: ID {card_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
