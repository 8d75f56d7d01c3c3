"""Payload encryption for every Temporal payload mmrag writes: AES-GCM, optional zlib.

Why a codec: workflow inputs, activity results, query answers, heartbeat details, static
summaries and (with ``DefaultFailureConverterWithEncodedAttributes``) failure messages all
land in the Temporal server's database and in its Web UI. They hold object URIs, tags,
questions, prompts and answers: customer data, which the seed keeps under customer-managed
keys. The codec runs in every client and worker, so the server only ever stores ciphertext;
the Web UI and the ``temporal`` CLI see plaintext only through ``mmrag codec-server``.

Format of an encrypted payload (``encoding: binary/encrypted``)::

    metadata  encoding=binary/encrypted, encryption-key-id=<id>, mmrag-codec=aesgcm-v2
    data      nonce (12 bytes) || AES-GCM( flag || body , aad )
              flag 0x00: body is the serialized original Payload (proto)
              flag 0x01: body is zlib(serialized Payload), used from a size threshold
    aad       "mmrag-codec" || 0x02 || for each of encoding, format, key id:
              its length (2 bytes, big-endian) || its bytes

The key id is in clear metadata so a reader picks the right key (rotation) and so a missing
key is reported by name. Everything in clear metadata that decides how a payload is read
(the encoding, the format and its version byte, the key id) is in the AAD, so relabelling any
of it (another key id, a downgrade to an older format) fails authentication instead of being
read some other way. The original payload's own metadata is inside the ciphertext.

The AAD does not bind the namespace or the workflow: payloads are encoded by the SDK's codec,
which is not told where a payload goes on every path (failure attributes, the replayer), and
the Web UI tells the codec server only the namespace. A payload can therefore be moved
between workflows by someone who can write to the Temporal server's database; it still
decrypts only with the key.

Format ``aesgcm-v1`` (aad ``"mmrag/aesgcm-v1/<id>"``: the format and the key id) is still
decoded, so histories recorded before v2 replay (``tests/fixtures/histories/encrypted``);
it is never written. Compression happens before
encryption (ciphertext does not compress) and only above a threshold: small payloads gain
nothing, and keeping them uncompressed keeps their length independent of their content.

Payloads that are not encrypted pass through ``decode`` untouched, so turning encryption on
for a running system keeps older plaintext histories readable. Key material never appears in
``repr``, logs or error messages: only key ids do.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from settings import Settings

log = logging.getLogger("mmrag.codec")

ENCODING = b"binary/encrypted"
KEY_ID_KEY = "encryption-key-id"
FORMAT_KEY = "mmrag-codec"
FORMAT = b"aesgcm-v2"  # written and read
FORMAT_V1 = b"aesgcm-v1"  # read only: payloads written before format v2
VERSION = b"\x02"  # the version byte of FORMAT, first thing in its AAD after the label
READABLE_FORMATS = (FORMAT, FORMAT_V1)
NONCE_BYTES = 12
RAW, ZLIB = b"\x00", b"\x01"
KEY_SIZES = (16, 24, 32)
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_NEW_KEY_HINT = (
    'generate one with: python -c "import base64, os; print(base64.b64encode(os.urandom(32))'
    '.decode())"'
)


class CodecConfigError(RuntimeError):
    """The codec settings are unusable (bad key, bad key file). Names the MMRAG_* setting."""


class CodecKeyError(RuntimeError):
    """A payload cannot be decrypted: its key is missing, or is not the key it was sealed with."""


def _aad(fmt: bytes, key_id: str) -> bytes:
    """The associated data of a payload in format ``fmt``: what its clear metadata says."""
    if fmt == FORMAT_V1:
        return b"mmrag/" + FORMAT_V1 + b"/" + key_id.encode()
    fields = (ENCODING, fmt, key_id.encode())
    return b"mmrag-codec" + VERSION + b"".join(len(f).to_bytes(2, "big") + f for f in fields)


def is_encrypted(payload: Payload) -> bool:
    """Whether a payload was written by this codec (as opposed to passed through plain)."""
    return payload.metadata.get("encoding") == ENCODING


def _check_key_id(key_id: str, where: str) -> str:
    if not _KEY_ID.match(key_id):
        raise CodecConfigError(
            f"{where}: key id {key_id!r} must be 1-64 characters of letters, digits, '.', '_', "
            "':' or '-' (it is stored in clear in every payload's metadata)"
        )
    return key_id


def decode_key(text: str, key_id: str, where: str) -> bytes:
    """A base64 AES key; the error names the key id and the setting, never the key."""
    cleaned = text.strip()
    try:
        raw = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise CodecConfigError(f"{where}: key {key_id!r} is not base64; {_NEW_KEY_HINT}") from None
    if len(raw) not in KEY_SIZES:
        raise CodecConfigError(
            f"{where}: key {key_id!r} decodes to {len(raw)} bytes; AES needs 16, 24 or 32 "
            f"(32 recommended); {_NEW_KEY_HINT}"
        )
    return raw


def parse_key_file(path: Path) -> tuple[dict[str, bytes], str]:
    """Keys in file order and the file's active key id ("" when it does not name one).

    Three formats, so the file can come from whatever a secret manager mounts:
    ``key_id=base64`` lines (``#`` comments), JSON or TOML with ``{"keys": {id: base64},
    "active": id}`` (or a flat ``{id: base64}`` object).
    """
    where = f"MMRAG_CODEC_KEY_FILE {path}"
    try:
        text = path.read_text()
    except OSError as e:
        raise CodecConfigError(f"{where}: cannot read it ({e.strerror})") from None
    try:
        if os.stat(path).st_mode & 0o077:
            log.warning("%s is readable by group or others: chmod 600 it", path)
    except OSError:
        pass
    entries: dict[str, str]
    active = ""
    stripped = text.lstrip()
    if path.suffix == ".toml" or path.suffix == ".json" or stripped.startswith("{"):
        try:
            doc = json.loads(text) if stripped.startswith("{") else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise CodecConfigError(f"{where}: not valid JSON/TOML ({type(e).__name__})") from None
        if not isinstance(doc, dict):
            raise CodecConfigError(f"{where}: expected a table of key ids")
        keys_obj = doc.get("keys", doc)
        active = str(doc.get("active", "")) if "keys" in doc else ""
        if not isinstance(keys_obj, dict) or not all(isinstance(v, str) for v in keys_obj.values()):
            raise CodecConfigError(f"{where}: 'keys' must map key ids to base64 strings")
        entries = {str(k): v for k, v in keys_obj.items()}
    else:
        entries = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, value = line.partition("=")
            if not sep:
                raise CodecConfigError(f"{where}: line {number} is not key_id=base64key")
            entries[key_id.strip()] = value.strip()
    if not entries:
        raise CodecConfigError(f"{where}: holds no keys")
    keys = {_check_key_id(k, where): decode_key(v, k, where) for k, v in entries.items()}
    if active and active not in keys:
        raise CodecConfigError(f"{where}: active key {active!r} is not among {sorted(keys)}")
    return keys, active


@dataclass(frozen=True)
class Keyring:
    """The keys one process holds: ``active`` encrypts, every key decrypts (rotation)."""

    keys: Mapping[str, bytes] = field(repr=False)
    active: str

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise CodecConfigError(f"active key {self.active!r} is not in the keyring")

    def __repr__(self) -> str:  # ids only: key bytes never reach a log line or a traceback
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring | None:
        """The keyring the MMRAG_CODEC_* settings describe, or None when encryption is off."""
        inline = settings.codec_key.get_secret_value().strip()
        key_id = settings.codec_key_id.strip()
        key_file = settings.codec_key_file.strip()
        keys: dict[str, bytes] = {}
        file_active = ""
        if key_file:
            keys, file_active = parse_key_file(Path(key_file).expanduser())
        if inline:
            inline_id = _check_key_id(key_id or "default", "MMRAG_CODEC_KEY_ID")
            if inline_id in keys and keys[inline_id] != decode_key(
                inline, inline_id, "MMRAG_CODEC_KEY"
            ):
                raise CodecConfigError(
                    f"MMRAG_CODEC_KEY and MMRAG_CODEC_KEY_FILE both define key {inline_id!r} "
                    "with different bytes: give the inline key another MMRAG_CODEC_KEY_ID"
                )
            keys[inline_id] = decode_key(inline, inline_id, "MMRAG_CODEC_KEY")
        if not keys:
            if key_id:
                raise CodecConfigError(
                    "MMRAG_CODEC_KEY_ID is set but there is no key: set MMRAG_CODEC_KEY or "
                    "MMRAG_CODEC_KEY_FILE"
                )
            return None
        if key_id:
            active = key_id
        elif inline:
            active = "default"
        else:
            active = file_active or next(iter(keys))
        if active not in keys:
            raise CodecConfigError(
                f"MMRAG_CODEC_KEY_ID names key {active!r}, but the keyring holds "
                f"{sorted(keys)}: add it to MMRAG_CODEC_KEY_FILE or set MMRAG_CODEC_KEY"
            )
        return cls(keys, active)


class EncryptionCodec(PayloadCodec):
    """AES-GCM (+ zlib above a threshold) for every payload; plaintext payloads pass through.

    With no keyring it encrypts nothing, but still recognises encrypted payloads and fails
    them with an error that says which key is missing and what to set, instead of the SDK's
    "unknown encoding" deep in a workflow task failure.
    """

    def __init__(self, keyring: Keyring | None, compress_min_bytes: int = 4096) -> None:
        self.keyring = keyring
        self.compress_min_bytes = compress_min_bytes
        self._ciphers = {k: AESGCM(v) for k, v in keyring.keys.items()} if keyring else {}

    def __repr__(self) -> str:
        return f"EncryptionCodec({self.keyring!r})"

    @property
    def enabled(self) -> bool:
        return self.keyring is not None

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encode_payload(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decode_payload(p) for p in payloads]

    def encode_payload(self, payload: Payload) -> Payload:
        if self.keyring is None or is_encrypted(payload):
            return payload
        key_id = self.keyring.active
        body = payload.SerializeToString()
        plain = RAW + body
        if 0 < self.compress_min_bytes <= len(body):
            packed = zlib.compress(body, 6)
            if len(packed) < len(body):
                plain = ZLIB + packed
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, plain, _aad(FORMAT, key_id))
        return Payload(
            metadata={
                "encoding": ENCODING,
                KEY_ID_KEY: key_id.encode(),
                FORMAT_KEY: FORMAT,
            },
            data=nonce + sealed,
        )

    def decode_payload(self, payload: Payload) -> Payload:
        if not is_encrypted(payload):
            return payload  # plaintext, e.g. written before encryption was turned on
        key_id = payload.metadata.get(KEY_ID_KEY, b"").decode(errors="replace")
        fmt = payload.metadata.get(FORMAT_KEY, b"")
        if fmt not in READABLE_FORMATS:
            raise CodecKeyError(
                f"payload is encrypted by another codec (format {fmt.decode(errors='replace')!r}"
                f", key id {key_id!r}); mmrag reads formats "
                f"{', '.join(repr(f.decode()) for f in READABLE_FORMATS)} only"
            )
        if self.keyring is None:
            raise CodecKeyError(
                f"payload is encrypted with key id {key_id!r} but no codec key is configured: "
                "set MMRAG_CODEC_KEY (+ MMRAG_CODEC_KEY_ID) or MMRAG_CODEC_KEY_FILE to a "
                f"keyring holding {key_id!r}"
            )
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CodecKeyError(
                f"payload is encrypted with key id {key_id!r}, which this process does not hold "
                f"(it has {sorted(self._ciphers)}): add {key_id!r} to MMRAG_CODEC_KEY_FILE "
                "(old keys must stay in the keyring while histories that use them exist)"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _aad(fmt, key_id))
        except InvalidTag:
            raise CodecKeyError(
                f"cannot decrypt a payload with key id {key_id!r}: the key this process holds "
                "under that id is not the one the payload was encrypted with (or the payload "
                "or its clear metadata was altered); check MMRAG_CODEC_KEY / MMRAG_CODEC_KEY_FILE"
            ) from None
        flag, body = plain[:1], plain[1:]
        if flag == ZLIB:
            body = zlib.decompress(body)
        elif flag != RAW:
            raise CodecKeyError(f"payload with key id {key_id!r} has an unknown body format")
        original = Payload()
        original.ParseFromString(body)
        return original


def codec_from_settings(settings: Settings) -> EncryptionCodec:
    """The codec every client, worker, replayer and the codec server build from settings."""
    return EncryptionCodec(Keyring.from_settings(settings), settings.codec_compress_min_bytes)
