"""Webhook pure logic: schedule, Retry-After, validation, address checks, signing, size."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from standardwebhooks.webhooks import Webhook

from flows.control import outbox
from flows.core.errors import ConfigError
from flows.notify import destinations, endpoint_checks, signing, webhook_delivery, webhook_events
from flows.notify import secrets as secrets_at_rest


def test_retry_schedule_follows_the_spec_with_bounded_jitter() -> None:
    exact = [webhook_delivery.retry_delay_s(n, rng=lambda a, b: 1.0) for n in range(1, 9)]
    assert exact == [5, 300, 1800, 7200, 18000, 36000, 36000, 36000]
    low = webhook_delivery.retry_delay_s(1, rng=lambda a, b: a)
    high = webhook_delivery.retry_delay_s(1, rng=lambda a, b: b)
    assert low == pytest.approx(4.5) and high == pytest.approx(5.5)
    assert len({webhook_delivery.retry_delay_s(3) for _ in range(20)}) > 1, "jitter spreads retries"


def test_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    assert webhook_delivery.retry_after_s("120", now) == 120
    assert webhook_delivery.retry_after_s("Sun, 29 Nov 2026 12:10:00 GMT", now) == 600
    assert webhook_delivery.retry_after_s("Sun, 29 Nov 2026 11:00:00 GMT", now) == 0
    assert webhook_delivery.retry_after_s("soon", now) is None
    assert webhook_delivery.retry_after_s(None, now) is None


def test_long_text_in_a_payload_is_cut_saying_how_long_it_was() -> None:
    """One helper shortens errors for events and for delivery attempts alike."""
    limit = webhook_events.MAX_ERROR_CHARS
    assert webhook_events.shorten(None) is None
    assert webhook_events.shorten("x" * limit) == "x" * limit
    cut = webhook_events.shorten("y" * (limit + 1))
    assert cut is not None and len(cut) <= limit and cut.endswith(f"({limit + 1} chars)")
    assert webhook_events.shorten("z" * 50, limit=30) == "z" * 10 + "... (50 chars)"


def test_event_types_validated() -> None:
    assert endpoint_checks.validate_event_types(None) == list(webhook_events.EVENT_TYPES)
    assert endpoint_checks.validate_event_types(["refresh.failed,table.failed", "refresh.failed"]) == [
        "refresh.failed",
        "table.failed",
    ]
    with pytest.raises(ConfigError, match=r"unknown event type\(s\) refresh.done"):
        endpoint_checks.validate_event_types(["refresh.done"])


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("example.com/x", "http:// or https://"),
        ("http:///x", "no host"),
        ("https://a:b@example.com/x", "credentials"),
        ("http://example.com:70000/x", "malformed"),
        ("http://127.0.0.1/x", "loopback, link-local or private"),
        ("http://[::1]/x", "loopback, link-local or private"),
        ("http://192.168.1.10/x", "loopback, link-local or private"),
        ("http://[::ffff:10.0.0.1]/x", "loopback, link-local or private"),
        ("http://169.254.169.254/latest/meta-data", "loopback, link-local or private"),
    ],
)
def test_bad_urls_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        endpoint_checks.validate_url(url, allow_private=False)


def test_private_allowed_when_the_operator_says_so() -> None:
    assert (
        endpoint_checks.validate_url(" http://127.0.0.1:8000/hook ", allow_private=True)
        == "http://127.0.0.1:8000/hook"
    )
    assert endpoint_checks.validate_url("https://8.8.8.8/hook", allow_private=False) == "https://8.8.8.8/hook"


def test_secret_format() -> None:
    s = signing.new_secret()
    assert s.startswith("whsec_") and len(base64.b64decode(s[6:])) >= 24
    assert s != signing.new_secret()


def test_signatures_verify_with_standardwebhooks_for_each_secret() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    payload = signing.body("refresh.completed", datetime(2026, 11, 29, tzinfo=UTC), {"run_id": "r"})
    headers = signing.sign_headers("msg_1", payload, [new, old], datetime.now(UTC))
    assert headers["webhook-signature"].count("v1,") == 2
    assert Webhook(new).verify(payload, headers)["data"] == {"run_id": "r"}
    assert Webhook(old).verify(payload, headers)["type"] == "refresh.completed"
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(signing.new_secret()).verify(payload, headers)


def test_body_is_deterministic() -> None:
    at = datetime(2026, 11, 29, 3, 4, 5, tzinfo=UTC) + timedelta(microseconds=7)
    assert signing.body("t", at, {"a": 1}) == signing.body("t", at, {"a": 1})
    assert signing.body("t", at, {"a": 1}).startswith('{"type":"t","timestamp":"2026-11-29T03:04:05.000007Z"')


def test_fit_drops_tables_to_stay_under_the_limit() -> None:
    data = {"tables": [{"error": "x" * 500} for _ in range(100)]}
    fitted = outbox.fit(data)
    assert len(str(fitted).encode()) < 20_000 and fitted["tables_omitted"] > 0
    small = {"tables": [{"error": "x"}]}
    assert outbox.fit(small) == {"tables": [{"error": "x"}]}


def test_fit_bounds_any_event_not_only_run_events() -> None:
    """validation.failed lists its periods; a table validated by day for years must still fit."""
    data = {"periods_failed": [f"2020-01-01 day {i}" for i in range(5000)], "message": "m" * 9000, "n": 1}
    fitted = outbox.fit(data)
    assert len(json.dumps(fitted).encode()) < 19_500
    assert fitted["periods_failed_omitted"] > 0 and fitted["n"] == 1
    assert len(fitted["message"]) < 2100


@pytest.mark.parametrize(
    ("address", "strict", "with_private"),
    [
        # (refused by default?, refused with REFRESH_WEBHOOK_ALLOW_PRIVATE?)
        ("8.8.8.8", False, False),
        ("2606:4700::1111", False, False),
        ("::ffff:8.8.8.8", False, False),
        ("2002:808:808::1", False, False),  # 6to4 of a public address
        ("127.0.0.1", True, False),
        ("::1", True, False),
        ("10.1.2.3", True, False),
        ("fc00::1", True, False),
        ("::ffff:127.0.0.1", True, False),
        ("100.64.0.1", True, False),  # shared (carrier-grade NAT) space
        ("192.0.2.1", True, False),  # documentation
        ("2002:7f00:1::1", True, False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", True, False),  # NAT64 of 10.0.0.1
        ("169.254.169.254", True, True),
        ("169.254.1.1", True, True),
        ("fe80::1", True, True),
        ("fe80::1%eth0", True, True),
        ("::ffff:169.254.169.254", True, True),
        ("2002:a9fe:a9fe::1", True, True),  # 6to4 of the metadata address
        ("64:ff9b::a9fe:a9fe", True, True),  # NAT64 of the metadata address
        ("100.100.100.200", True, True),  # Alibaba metadata
        ("fd00:ec2::254", True, True),  # AWS metadata over IPv6
        ("168.63.129.16", True, True),  # Azure WireServer: globally routable, still refused
        ("224.0.0.1", True, True),
        ("255.255.255.255", True, True),
        ("0.0.0.0", True, True),
        ("::", True, True),
    ],
)
def test_destination_rules_per_address(address: str, strict: bool, with_private: bool) -> None:
    assert (destinations.refusal(address, allow_private=False) is not None) is strict
    assert (destinations.refusal(address, allow_private=True) is not None) is with_private


def test_one_bad_address_refuses_the_host_and_the_name_is_resolved_once() -> None:
    calls: list[tuple[str, int]] = []

    def resolver(answer: list[str]) -> destinations.Resolver:
        def resolve(host: str, port: int) -> list[str]:
            calls.append((host, port))
            return answer

        return resolve

    url = "https://hooks.example.test/x"
    assert destinations.vet(url, False, resolver(["93.184.215.14", "2606:2800::1"])) == "93.184.215.14"
    assert calls == [("hooks.example.test", 443)]
    for allow_private in (False, True):
        with pytest.raises(ConfigError, match=r"169\.254\.169\.254 \(a cloud metadata service\)"):
            destinations.vet(url, allow_private, resolver(["93.184.215.14", "169.254.169.254"]))
    with pytest.raises(ConfigError, match=r"10\.0\.0\.7 .*REFRESH_WEBHOOK_ALLOW_PRIVATE"):
        endpoint_checks.check_destination(url, False, resolver(["10.0.0.7"]))
    assert endpoint_checks.check_destination(url, True, resolver(["10.0.0.7"])) == "10.0.0.7"

    def broken(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(ConfigError, match="does not resolve"):
        destinations.vet(url, False, broken)


@pytest.mark.parametrize(
    ("url", "allow_private"),
    [
        ("http://100.100.100.200/latest/meta-data", False),
        ("http://100.64.1.1/hook", False),
        ("http://[2002:a9fe:a9fe::1]/hook", False),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://[fe80::1]/hook", True),
        ("http://100.100.100.200/hook", True),
    ],
)
def test_urls_refused_by_address_class(url: str, allow_private: bool) -> None:
    """Literal addresses: getaddrinfo answers without asking DNS."""
    with pytest.raises(ConfigError, match="refused"):
        endpoint_checks.validate_url(url, allow_private=allow_private)


def _race_for_the_key(path: Path, creators: int = 8) -> tuple[list[bytes], list[bytes]]:
    """`creators` threads create the key at once while one polls the path: (their keys, any
    content the poller saw that was not a whole key)."""
    start, keys, torn = threading.Barrier(creators + 1), [], []

    def create() -> None:
        start.wait()
        keys.append(secrets_at_rest.key_file(path))

    def watch() -> None:
        start.wait()
        for _ in range(2000):
            if path.exists() and len(content := path.read_bytes().strip()) != 44:
                torn.append(content)

    threads = [threading.Thread(target=create) for _ in range(creators)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return keys, torn


def test_key_file_appears_whole_when_many_create_it_at_once(tmp_path: Path) -> None:
    for n in range(40):
        path = tmp_path / f"k{n}" / secrets_at_rest.KEY_FILE
        path.parent.mkdir()
        keys, torn = _race_for_the_key(path)
        assert not torn, f"round {n}: a reader saw {torn[0]!r}"
        assert len(keys) == 8 and len(set(keys)) == 1, "every creator uses the one key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left"


def test_a_passphrase_goes_through_scrypt_with_a_salt_stored_beside_the_token() -> None:
    box = secrets_at_rest.SecretBox(passphrase="correct horse")
    one, two = box.encrypt("whsec_abc"), box.encrypt("whsec_abc")
    assert one.startswith("scrypt$") and one.split("$")[1] != two.split("$")[1], "a fresh salt each"
    salt, token = base64.urlsafe_b64decode(one.split("$")[1]), one.split("$")[2]
    assert len(salt) == 16
    kdf = Scrypt(salt=salt, length=32, n=2**14, r=8, p=1)
    by_scrypt = Fernet(base64.urlsafe_b64encode(kdf.derive(b"correct horse")))
    assert by_scrypt.decrypt(token.encode()) == b"whsec_abc"
    by_sha256 = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"correct horse").digest()))
    with pytest.raises(InvalidToken):
        by_sha256.decrypt(token.encode())
    assert box.decrypt(one) == box.decrypt(two) == "whsec_abc"
    # A value from the earlier SHA-256 derivation is still read (and flagged for re-encryption).
    legacy = by_sha256.encrypt(b"whsec_old").decode()
    assert box.decrypt(legacy) == "whsec_old" and box.is_legacy(legacy) and not box.is_legacy(one)
    with pytest.raises(InvalidToken):
        secrets_at_rest.SecretBox(passphrase="wrong").decrypt(one)
