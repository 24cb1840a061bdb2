"""Webhook delivery: refuse private targets, sign per Standard Webhooks, retry with exponential backoff.

Where deliveries run: in the API process, on a small thread pool fed from Redis (`jobs/webhooks.py`),
never in a worker. A dead, slow or hanging target then costs one sender thread for at most
`webhook_timeout_seconds` per attempt and never touches the sampling loop (no threads, no sockets, no GIL
contention in the GPU process), and the body is built by `describe_job`, so it is exactly what
`GET /jobs/{id}` returns. Due deliveries live in Redis, so a restart of the API loses none, and every
replica drains the same set. Each delivery connects to an address that passed the SSRF check (no second
DNS lookup for a rebinding name to answer differently).

Retried: timeouts, connection errors, 5xx and 429, after 1, 2, 4 ... s (`webhook_backoff_seconds`,
capped at 60 s) until `webhook_retry_seconds` after the first attempt. Not retried: other 4xx, a refused
target. Each attempt is logged per job (`GET /jobs/{id}/webhooks`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from redis import Redis
from standardwebhooks import Webhook

from jobs.queue import fetch_job
from jobs.settings import Settings
from jobs.webhooks import Delivery, claim_due, record_attempt, schedule

from .errors import TargetRefused

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 60.0
RETRIED_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 ranges that carry an IPv4 address, which a translator or tunnel delivers to: RFC 6052 NAT64 prefixes
# (the well-known /96, and the local-use /48 with each prefix length RFC 8215 allows in it), 6to4, Teredo
# the deprecated IPv4-compatible form and SIIT's IPv4-translated form (RFC 2765 `::ffff:0:a.b.c.d`); IPv4-mapped
# addresses are Python's `ipv4_mapped`.
NAT64_PREFIXES = (
    (ipaddress.ip_network("64:ff9b::/96"), (96,)),
    (ipaddress.ip_network("64:ff9b:1::/48"), (48, 56, 64, 96)),  # local use: any layout may be in use
)
LOW_32_BITS_IPV4 = (ipaddress.ip_network("::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))  # compatible, translated


def _rfc6052_ipv4(address: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address inside a NAT64 address with a prefix of `prefix_length` bits (RFC 6052, section 2.2:
    the 32 bits start right after the prefix and skip bits 64-71)."""
    bits = f"{int(address):0128b}"
    ipv4_bits = bits[prefix_length:64] + bits[72:] if prefix_length < 64 else bits[max(prefix_length, 72):]
    return ipaddress.IPv4Address(int(ipv4_bits[:32], 2))


def embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to through a translator or tunnel (none for IPv4)."""
    if address.version == 4:
        return []
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    for network, lengths in NAT64_PREFIXES:
        if address in network:
            found += [_rfc6052_ipv4(address, length) for length in lengths]
    if any(address in network for network in LOW_32_BITS_IPV4) and int(address) > 1:  # :: and ::1 are themselves
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ipv4 for ipv4 in found if ipv4 is not None]


def is_public(address: Address) -> bool:
    """Globally reachable, and so is every IPv4 address it embeds (Python's `is_global` takes
    [64:ff9b::7f00:1], [2002:7f00:1::] and [::127.0.0.1] for public: they lead to 127.0.0.1)."""
    return address.is_global and all(ipv4.is_global for ipv4 in embedded_ipv4(address))


def check_target(url: str, *, allow_private: bool) -> list[Address]:
    """Refuse URLs that are not http(s), do not resolve, or resolve to a non-public address (SSRF); return
    every address the name resolved to, in the resolver's order: the ones a delivery may connect to.

    Raises:
        TargetRefused: naming `webhook_url`.
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.host:
        raise TargetRefused("webhook_url must be an http:// or https:// URL with a host", field="webhook_url")
    host, port = target.raw_host.decode("ascii"), target.port or (443 if target.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise TargetRefused(f"webhook_url host {target.host!r} does not resolve", field="webhook_url") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    for address in addresses:
        if not allow_private and not is_public(address):
            raise TargetRefused(
                f"webhook_url resolves to {address}, a loopback, private or link-local address (or one that "
                "embeds such an IPv4 address)", field="webhook_url",
            )  # fmt: skip
    return addresses


def post_to_checked_address(
    http: httpx.Client, url: str, *, allow_private: bool, content: str, headers: dict[str, str]
) -> httpx.Response:
    """POST to an address `check_target` approved, not to a fresh lookup of the name: a DNS answer that
    changes between check and connect (DNS rebinding) cannot turn a public target into an internal one.
    The name still goes in `Host` and in TLS (SNI and the certificate check); an address that refuses the
    connection passes to the next, as a connect by name would. Use `delivery_client()`'s client."""
    target = httpx.URL(url)
    pinned_headers = {**headers, "host": target.netloc.decode("ascii")}
    refused: httpx.TransportError | None = None
    for address in check_target(url, allow_private=allow_private):
        try:
            return http.post(target.copy_with(host=str(address)), content=content, headers=pinned_headers,
                             extensions={"sni_hostname": target.raw_host.decode("ascii")})  # fmt: skip
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            refused = exc
    raise refused


def delivery_client(timeout_seconds: float) -> httpx.Client:
    """The HTTP client for `post_to_checked_address`. No kept-alive connections: the pool would match a
    later delivery to another name on the same IP to an open connection whose TLS checked the first name.
    No proxy from the environment: a proxy would connect by the pinned IP and check TLS against it."""
    return httpx.Client(timeout=timeout_seconds, follow_redirects=False, trust_env=False,
                        limits=httpx.Limits(max_keepalive_connections=0))  # fmt: skip


def backoff_seconds(attempt: int, *, base: float) -> float:
    """Delay after failed attempt number `attempt` (1-based): base, 2·base, 4·base ... capped at 60 s."""
    return min(base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)


class WebhookSender:
    """Claims due deliveries from Redis and sends them on a thread pool; `start()` / `stop()` with the app."""

    def __init__(self, *, redis: Redis, settings: Settings, describe: Callable[[object], str]):
        """`describe(job)` gives the body: the job JSON as `GET /jobs/{id}` shows it."""
        self.redis, self.settings, self.describe = redis, settings, describe
        self.signer = Webhook(settings.webhook_secret.get_secret_value()) if settings.webhook_secret else None
        self.http = delivery_client(settings.webhook_timeout_seconds)
        self.pool = ThreadPoolExecutor(settings.webhook_senders, thread_name_prefix="webhook")
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="webhook-dispatch", daemon=True)

    def start(self) -> None:
        if self.signer is not None:
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def _run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                with self.lock:
                    free = self.settings.webhook_senders - len(self.in_flight)
                    due = claim_due(self.redis, limit=free, skip_jobs=set(self.in_flight)) if free > 0 else []
                    self.in_flight.update(delivery.job_id for delivery in due)
                for delivery in due:
                    self.pool.submit(self._deliver_and_release, delivery)
            except Exception:  # a Redis blip must not end delivery for the life of the process
                log.warning("webhook dispatch failed; retrying", exc_info=True)

    def _deliver_and_release(self, delivery: Delivery) -> None:
        try:
            self.deliver(delivery)
        except Exception:
            log.exception("job %s: webhook %s crashed", delivery.job_id, delivery.id)
        finally:
            with self.lock:
                self.in_flight.discard(delivery.job_id)

    def deliver(self, delivery: Delivery) -> None:
        """One attempt: send, log the attempt, and schedule the next one if the failure is worth retrying."""
        job = fetch_job(self.redis, delivery.job_id)
        if job is None:
            return  # expired: nobody can read it any more
        subscription = job.meta["webhook"]
        body = delivery.body or self.describe(job)
        attempt = {"webhook_id": delivery.id, "event": delivery.event, "attempt": delivery.attempt,
                   "at": dt.datetime.now(dt.UTC).isoformat(), "status_code": None, "error": None}  # fmt: skip
        started = time.perf_counter()
        retry = False
        try:
            response = post_to_checked_address(
                self.http, subscription["url"], allow_private=self.settings.webhook_allow_private, content=body,
                headers=self._headers(delivery.id, body),
            )  # fmt: skip
            attempt["status_code"] = response.status_code
            retry = response.status_code in RETRIED_STATUSES
            if not response.is_success:
                attempt["error"] = f"HTTP {response.status_code}"
        except TargetRefused as exc:
            attempt["error"] = exc.message
        except httpx.HTTPError as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            retry = True
        attempt["duration_ms"] = round(1000 * (time.perf_counter() - started), 1)
        delay = backoff_seconds(delivery.attempt, base=self.settings.webhook_backoff_seconds)
        if retry and time.time() + delay <= delivery.first_at + self.settings.webhook_retry_seconds:
            attempt["outcome"], attempt["next_attempt_in_seconds"] = "retrying", delay
            schedule(self.redis, delivery.next_attempt(body), at=time.time() + delay)
        else:
            attempt["outcome"] = "delivered" if attempt["error"] is None else "gave_up"
        log.info("job %s: webhook %s %s attempt %d: %s", job.id, delivery.id, delivery.event, delivery.attempt,
                 attempt["error"] or attempt["status_code"])  # fmt: skip
        record_attempt(self.redis, job.id, attempt, ttl_seconds=self.settings.job_ttl_seconds)

    def _headers(self, webhook_id: str, body: str) -> dict[str, str]:
        now = dt.datetime.now(dt.UTC)
        return {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(webhook_id, now, body),
        }
