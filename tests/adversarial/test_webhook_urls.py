"""Probe class 6: webhook targets that would make the service call into its own network.

A webhook is a request the service makes on a tenant's behalf, so a target on the loopback, a
private, shared, link-local, unique-local, multicast, unspecified or reserved address would let
a tenant reach what only the service can (server-side request forgery: a metadata endpoint, an
admin port). In production every such target is refused when the job or batch is submitted, in
every spelling of the address: IPv4 inside IPv6 (mapped, compatible, 6to4, NAT64, Teredo), IPv4
in decimal, hex, octal or short forms and with full-width digits, zone ids, names of the machine
(`localhost`, `*.localhost`) and of local networks (`.local`, `.internal`, single labels),
credentials in the URL, other schemes, and control characters or whitespace (CR/LF would split
the request line of the delivery). Each is a 422 naming `webhook.url`, on jobs and on batches,
with the URL bare, with a port and with a path; and none of these hosts is ever looked up in
DNS (the API process logs its lookups): they are judged by what they are, before resolving.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.adversarial.instance import PUBLIC_HOOK, Instance, Tally, brief, fields_of, is_problem

HOSTS = [
    # IPv4 loopback, private, shared, link-local, multicast, unspecified, reserved
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.1.1",
    "100.64.0.1", "169.254.169.254", "224.0.0.1", "239.255.255.250", "0.0.0.0", "240.0.0.1",
    "255.255.255.255", "192.0.0.8", "198.18.0.1", "192.0.2.1",
    # other spellings of IPv4
    "2130706433", "0x7f000001", "0x7f.0x0.0x0.0x1", "017700000001", "0177.0.0.1", "127.1",
    "127.0.1", "0", "0x0", "3232235777", "0xa9fea9fe", "012.0.0.1", "127.000.000.001",
    "１２７.０.０.１", "127。0。0。1", "169.254.169.254.", "[::ffff:127.0.0.1]",
    # IPv6
    "[::1]", "[::]", "[0:0:0:0:0:0:0:1]", "[::ffff:7f00:1]", "[::ffff:169.254.169.254]",
    "[::127.0.0.1]", "[::10.0.0.1]", "[2002:7f00:1::]", "[2002:a00:1::1]", "[2002:c0a8:101::]",
    "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::a00:1]", "[2001:0:4136:e378::1]",
    "[fe80::1]", "[fe80::1%25eth0]", "[fe80::1%eth0]", "[fc00::1]", "[fd12:3456:789a::1]",
    "[fec0::1]", "[ff02::1]", "[ff05::1:3]", "[2001:db8::1]", "[100::1]",
    # names of the machine and of local networks
    "localhost", "LOCALHOST", "localhost.", "api.localhost", "ip6-localhost", "ip6-loopback",
    "localhost.localdomain", "printer.local", "db.internal", "router.home.arpa", "intranet",
    "metadata", "kubernetes.default.svc.cluster.local",
]  # fmt: skip
URLS = [
    # credentials, schemes, characters
    "https://user:pass@93.184.215.14/", "https://93.184.215.14@127.0.0.1/",
    "https://127.0.0.1#@93.184.215.14/", "http://93.184.215.14/hook", "ftp://93.184.215.14/",
    "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "dict://127.0.0.1:6379/info",
    "javascript:alert(1)", "//93.184.215.14/", "93.184.215.14/hook", "https:///hook",
    "https://93.184.215.14:0/", "https://93.184.215.14:99999/",
    "https://93.184.215.14/\r\nX-Injected: 1", "https://93.184.215.14/\nHost: 127.0.0.1",
    "https://93.184.215.14/ hook", "https://93.184.215.14/\thook", "https://93.184.215.14/\x00",
    "https://93.184.215.14/\x7f", "https://93.184.215.14/\u2028", "https://93.184.215.14\\@10.0.0.1/",
    "https://93.184.215.14/" + "a" * 2100,
]  # fmt: skip


def urls() -> list[str]:
    found = []
    for host in HOSTS:
        found += [f"https://{host}/", f"https://{host}:8443/hook?x=1", f"http://{host}/"]
    return found + URLS


def test_non_public_targets_are_refused_in_every_encoding(instance: Instance, tally: Tally):
    probe = tally["6"]
    a = instance.tenants["adv-alpha"]
    # Control: a public address is accepted, on both routes.
    for path, body in (("/v1/jobs", {"kind": "guided", "params": {"classes": [1]}}),
                       ("/v1/batches", {"kind": "guided", "classes": [1]})):  # fmt: skip
        response = instance.request("POST", path, json=body | {"webhook": {"url": PUBLIC_HOOK}},
                                    headers=a.headers())  # fmt: skip
        assert response.status_code == 202, response.text
    looked_up_before = len(instance.lookups())

    attempts: list[Callable[[], str | None]] = []
    for url in urls():
        for path, body in (("/v1/jobs", {"kind": "guided", "params": {"classes": [1]}}),
                           ("/v1/batches", {"kind": "guided", "classes": [1]})):  # fmt: skip

            def attempt(url: str = url, path: str = path, body: dict = body) -> str | None:
                response = instance.request("POST", path, json=body | {"webhook": {"url": url}},
                                            headers=a.headers())  # fmt: skip
                if is_problem(response, 422) and "webhook.url" in fields_of(response):
                    return None
                return f"{path} {url!r}: {brief(response)}"

            attempts.append(attempt)
    failures = probe.run(attempts)
    resolved = [h for h in instance.lookups()[looked_up_before:] if h != "127.0.0.1"]
    probe.record(f"looked up: {sorted(set(resolved))[:10]}" if resolved else None)
    assert not failures, failures[:10]
    assert not resolved, sorted(set(resolved))
    assert probe.attempts >= 450, probe.attempts
