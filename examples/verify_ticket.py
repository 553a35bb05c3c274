#!/usr/bin/env python3
"""Verify a wslb dispatch ticket (docs/DISPATCH.md), standard library only.

A backend behind `wslb --dispatch-path ... --dispatch-secret S` calls `verify()` on the
`wslb_ticket` query parameter of each new connection and refuses the connection when it
raises, so only clients the balancer dispatched (recently, to this backend) get in.

    from verify_ticket import verify, TicketError
    verify(query_params["wslb_ticket"], secret=b"...", guid="my-backend-guid")

Command line (exit 0 = accepted, 1 = refused, 2 = usage):

    verify_ticket.py SECRET TICKET_OR_URL [--guid GUID] [--now UNIX_SECONDS]
"""

import hashlib
import hmac
import sys
import time
from urllib.parse import parse_qs, urlsplit

MAX_TICKET_LEN = 128 + 1 + 20 + 1 + 64
GUID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")


class TicketError(Exception):
    """The ticket is refused; the message says why."""


def verify(ticket, secret, guid=None, now=None):
    """Returns the ticket's expiry (unix seconds) or raises TicketError.

    ticket: `<guid>.<expires>.<mac>`; secret: bytes (--dispatch-secret); guid: this
    backend's guid (a ticket for another backend is refused); now: unix seconds.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    if len(ticket) > MAX_TICKET_LEN:
        raise TicketError("malformed")
    signed, dot, mac = ticket.rpartition(".")
    tid, dot2, expires = signed.rpartition(".")
    if not dot or not dot2 or not tid or len(tid) > 128 or not set(tid) <= GUID_CHARS:
        raise TicketError("malformed")
    if not expires.isdigit() or not expires.isascii() or (len(expires) > 1 and expires[0] == "0"):
        raise TicketError("malformed")
    expected = hmac.new(secret, signed.encode(), hashlib.sha256).hexdigest()
    # compare_digest: constant time, so the MAC cannot be guessed byte by byte.
    if not hmac.compare_digest(expected, mac):
        raise TicketError("bad mac")
    now = int(time.time()) if now is None else now
    if now >= int(expires):
        raise TicketError("expired")
    if guid is not None and guid != tid:
        raise TicketError("issued for another backend")
    return int(expires)


def ticket_of(text):
    """The ticket in a dispatched URL (its `wslb_ticket` parameter), or `text` itself."""
    if "://" not in text:
        return text
    values = parse_qs(urlsplit(text).query).get("wslb_ticket", [])
    if len(values) != 1:
        raise TicketError("no single wslb_ticket parameter")
    return values[0]


def main(argv):
    args = list(argv[1:])
    opts = {}
    for name in ("--guid", "--now"):
        if name in args:
            i = args.index(name)
            if i + 1 >= len(args):
                print(f"{name} needs a value", file=sys.stderr)
                return 2
            opts[name] = args[i + 1]
            del args[i : i + 2]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    secret, text = args
    try:
        now = int(opts["--now"]) if "--now" in opts else None
        expires = verify(ticket_of(text), secret.encode(), opts.get("--guid"), now)
    except (TicketError, ValueError) as e:
        print(f"refused: {e}")
        return 1
    print(f"accepted: valid until {expires}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
