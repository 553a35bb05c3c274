#!/usr/bin/env bash
# Installs Autobahn|Testsuite (wstest) into target/autobahn/py27, idempotently, and Python
# websockets (the second echo server) into target/autobahn/py3.
# autobahntestsuite is Python-2-only and Python 2.7 has no venv module: the Python 3 venv
# holds virtualenv<20.22 (the last line able to create 2.7 environments), which creates the
# 2.7 environment from pyenv's CPython 2.7.18 (pulls Twisted 19.10 and autobahn 0.10.9).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=target/autobahn
PY27="${PY27:-$HOME/.pyenv/versions/2.7.18/bin/python2.7}"
WSTEST="$DIR/py27/bin/wstest"

if [ -x "$WSTEST" ] && "$DIR/py27/bin/python" -c 'import autobahntestsuite' 2>/dev/null \
    && "$DIR/py3/bin/python" -c 'import websockets' 2>/dev/null; then
    exit 0
fi
if [ ! -x "$PY27" ]; then
    echo "autobahn: CPython 2.7 not found at $PY27" >&2
    echo "autobahn: install it with 'pyenv install 2.7.18' or set PY27=/path/to/python2.7" >&2
    exit 1
fi
mkdir -p "$DIR"
if [ ! -x "$DIR/py3/bin/pip" ]; then
    python3 -m venv "$DIR/py3"
fi
"$DIR/py3/bin/pip" install -q 'virtualenv<20.22' 'websockets>=14'

if [ ! -x "$DIR/py27/bin/pip" ]; then
    rm -rf "$DIR/py27"
    "$DIR/py3/bin/virtualenv" -q -p "$PY27" "$DIR/py27"
fi
"$DIR/py27/bin/pip" install -q autobahntestsuite
"$WSTEST" --help >/dev/null
echo "autobahn: $WSTEST ready"
