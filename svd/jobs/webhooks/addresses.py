"""Where a webhook may go: outbound requests are dangerous.

A URL is called only when every address its host resolves to is public (or allowed by
SVD_WEBHOOK_HOSTS), checked at submit and again at every try, and the request goes to the
address checked (svd/jobs/webhooks/delivery.py), with no redirects followed.
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from svd.base.errors import BadInput


@dataclass(frozen=True)
class WebhookHosts:
    """SVD_WEBHOOK_HOSTS: host names and networks called although not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> WebhookHosts:
        hosts, networks = set(), []
        for item in filter(None, (part.strip().lower() for part in text.split(","))):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item)
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        public = address.is_global and all(inner.is_global for inner in _embedded(address))
        return public or host in self.hosts or any(address in network for network in self.networks)


# IPv6 forms that a gateway turns into the IPv4 address they carry in their last 32 bits
# (NAT64, SIIT's IPv4-translated) or bits 16-48 (6to4): the carried address must be public too.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


def _embedded(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if address.version == 4:
        return []
    carried = [address.ipv4_mapped, address.sixtofour]
    if address in NAT64 or address in TRANSLATED:
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [inner for inner in carried if inner is not None]


class Unresolved(BadInput):
    """The host did not resolve now; a later try may find it (DNS down or slow, EAI_AGAIN)."""


# A lookup's deadline. getaddrinfo has none of its own: it runs on a few threads of its own,
# so lookups stuck on a dead resolver hold those, never a request's or a sender's.
LOOKUP_SECONDS = 5.0
_lookups = ThreadPoolExecutor(4, thread_name_prefix="svd-lookup")


def checked_address(url: str, allowed: WebhookHosts, lookup_seconds: float = LOOKUP_SECONDS) -> str:
    """The address to call `url` at; BadInput naming `webhook` and why when it may not be called,
    Unresolved when its host does not resolve now (within `lookup_seconds`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadInput(f"`webhook` must be an http or https URL, got scheme {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise BadInput("`webhook` has no host: send a full URL such as https://example.com/hook")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = _lookups.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(lookup_seconds)
    except TimeoutError:
        raise Unresolved(f"`webhook` host {host!r} did not resolve within {lookup_seconds:g} s") from None
    except (OSError, ValueError) as exc:
        raise Unresolved(f"`webhook` host {host!r} does not resolve: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in found]
    refused = [str(address) for address in addresses if not allowed.admits(host, address)]
    if refused:
        raise BadInput(
            f"`webhook` host {host!r} resolves to {', '.join(refused)}, not a public address: the service calls "
            "only public addresses, unless SVD_WEBHOOK_HOSTS allows the host or its network"
        )
    return str(addresses[0])
