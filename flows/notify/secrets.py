"""Webhook signing secrets at rest: the key that encrypts them and the encryption.

HMAC needs the raw secret, so secrets are encrypted (Fernet), not hashed. The key is either
derived from the passphrase in REFRESH_SECRET_KEY with scrypt and a random salt stored with
each value (`scrypt$<salt>$<token>`: any machine with the passphrase reads it), or a random key
generated once into a 0600 file in the state directory (that machine only). Values encrypted
with the passphrase's earlier SHA-256 derivation stay readable and are re-encrypted with scrypt
the next time the secrets are opened.
"""

from __future__ import annotations

import base64
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import psycopg
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from flows.control import outbox
from flows.core.errors import ConfigError
from flows.core.private_files import create_once
from flows.core.settings import Settings

KEY_FILE = "webhook-secrets.key"
SCRYPT_PREFIX = "scrypt$"
SALT_BYTES = 16
# scrypt cost: ~50 ms and 16 MiB per derivation; each salt is derived once per process.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def key_file(path: Path) -> bytes:
    """The generated key (mode 0600), created once; a concurrent creator's key wins."""
    create_once(path, Fernet.generate_key)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            f"the webhook key file {path} is not a key (empty or damaged): restore it from a backup, "
            "or remove it and run `refresh webhooks rotate-secret` for every endpoint"
        ) from None
    return key


@lru_cache(maxsize=256)
def _derived(passphrase: str, salt: bytes) -> Fernet:
    kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return Fernet(base64.urlsafe_b64encode(kdf.derive(passphrase.encode())))


class SecretBox:
    """Encrypts and decrypts secrets with this machine's key (passphrase or key file)."""

    def __init__(self, passphrase: str | None = None, key: bytes | None = None) -> None:
        if (passphrase is None) == (key is None):
            raise ValueError("a passphrase or a key, not both")
        self._passphrase = passphrase
        self._key = Fernet(key) if key is not None else None

    def encrypt(self, secret: str) -> str:
        if self._passphrase is None:
            assert self._key is not None
            return self._key.encrypt(secret.encode()).decode()
        salt = os.urandom(SALT_BYTES)
        token = _derived(self._passphrase, salt).encrypt(secret.encode()).decode()
        return f"{SCRYPT_PREFIX}{base64.urlsafe_b64encode(salt).decode()}${token}"

    def decrypt(self, value: str) -> str:
        """The secret; InvalidToken when this key did not encrypt it."""
        if value.startswith(SCRYPT_PREFIX):
            if self._passphrase is None:
                raise InvalidToken
            salt, _, token = value.removeprefix(SCRYPT_PREFIX).partition("$")
            return _derived(self._passphrase, base64.urlsafe_b64decode(salt)).decrypt(token).decode()
        if self._passphrase is not None:
            return self._legacy().decrypt(value.encode()).decode()
        assert self._key is not None
        return self._key.decrypt(value.encode()).decode()

    def is_legacy(self, value: str) -> bool:
        """Encrypted with the passphrase's old single SHA-256 derivation (no salt)."""
        return self._passphrase is not None and not value.startswith(SCRYPT_PREFIX)

    def _legacy(self) -> Fernet:
        assert self._passphrase is not None
        return Fernet(base64.urlsafe_b64encode(hashlib.sha256(self._passphrase.encode()).digest()))


def open_secrets(settings: Settings, conn: psycopg.Connection) -> SecretBox:
    """This machine's SecretBox, with the passphrase's legacy values re-encrypted (in the
    caller's transaction). A ConfigError, in one line, when endpoints exist but this machine
    has neither the passphrase nor the key file: creating a new key would only make secrets
    that the other machine cannot read, and leave theirs unreadable here."""
    schema = settings.control_schema
    if settings.secret_key is not None:
        box = SecretBox(passphrase=settings.secret_key.get_secret_value())
        for endpoint_id, column, value in outbox.stored_secrets(conn, schema):
            if box.is_legacy(value):
                try:
                    upgraded = box.encrypt(box.decrypt(value))
                except InvalidToken:
                    continue  # not this passphrase's: its attempts say so
                outbox.replace_stored_secret(conn, schema, endpoint_id, column, value, upgraded)
        return box
    path = settings.state_dir / KEY_FILE
    if not path.exists() and outbox.stored_secrets(conn, schema):
        raise ConfigError(
            f"webhook endpoints exist but this machine has no key for their secrets (REFRESH_SECRET_KEY "
            f"is unset and {path} is missing): set REFRESH_SECRET_KEY as where they were created, "
            "or copy that machine's key file here"
        )
    return SecretBox(key=key_file(path))
