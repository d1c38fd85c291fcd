"""Imported first by the API process of the adversarial suite (this folder leads its
PYTHONPATH): an audit hook (PEP 578) that appends each host name the process resolves to the
file named by DIGIN_TEST_DNS_LOG, one JSON string a line. It only observes: every lookup still
goes to the system's resolver."""

import json
import os
import sys

_PATH = os.environ.get("DIGIN_TEST_DNS_LOG")
_EVENTS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}

if _PATH:
    _fd = os.open(_PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _hook(event: str, args: tuple) -> None:
        if event in _EVENTS and args:
            host = args[0]
            if isinstance(host, tuple):  # getnameinfo: (address, port)
                host = host[0]
            if isinstance(host, bytes):
                host = host.decode("latin-1")
            os.write(_fd, (json.dumps(str(host)) + "\n").encode())

    sys.addaudithook(_hook)
