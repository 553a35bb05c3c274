"""Autobahn's servers as `wstest -m fuzzingserver` / `-m echoserver` run them, with two
changes for running behind a proxy (Python 2.7, in the autobahntestsuite environment).

- Autobahn checks that the Host header's port is the port it listens on. A client that goes
  through a proxy names the proxy's port (HAProxy and nginx keep Host too), so the check
  refuses every handshake that is not direct. It is turned off; it is no part of the cases.
- It binds 127.0.0.1:0; the port taken is printed as "PORT <n>".

Usage: wstest_server.py fuzzingserver SPEC.json   (the spec `wstest -s` reads; its url's
                                                   port is ignored)
       wstest_server.py echoserver
"""

import json
import sys

from twisted.internet import reactor

from autobahn.twisted.websocket import listenWS
from autobahntestsuite import echo, fuzzing


def main():
    mode = sys.argv[1]
    if mode == "fuzzingserver":
        with open(sys.argv[2]) as f:
            spec = json.load(f)
        spec["url"] = "ws://127.0.0.1:0"
        factory = fuzzing.FuzzingServerFactory(spec)
    elif mode == "echoserver":
        factory = echo.EchoServerFactory("ws://127.0.0.1:0")
    else:
        sys.exit("wstest_server.py: unknown mode %r" % mode)
    factory.externalPort = None
    listener = listenWS(factory, interface="127.0.0.1")
    print("PORT %d" % listener.getHost().port)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
