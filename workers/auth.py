"""Tenant credentials: who started a workflow run, proven on every run.

A caller attaches a signed credential to every workflow it starts, in the Temporal workflow
header ``mmrag_auth``: a JWT signed with Ed25519 (PyJWT + cryptography) whose claims are
``tenants`` (tenant names; ``["*"]`` only for operators), ``role`` (``reader`` < ``writer``
< ``operator``), ``exp``, ``iat`` and ``sub``, with the signing key's id in the JWT header
``kid``. The workflow input's ``tenant`` is a claim to check against it, never an identity.

Workers hold verification keys only (``MMRAG_AUTH_VERIFY_KEYS_FILE``, JSON ``{kid: public
PEM}``, several at once so keys rotate). :class:`AuthInterceptor` checks the credential
before any workflow code runs; a missing, malformed, expired, forged, unknown-key,
wrong-tenant or wrong-role credential fails the run at once with a non-retryable
``Unauthorized`` error whose one line says what to fix, after an audit row (never the token)
is written by the ``audit_refusal`` local activity.

Determinism: expiry is checked against workflow time (the task's start time, from history).
A refusal records a patch marker (``REFUSED_MARKER``). On replay the history is trusted: a run
whose history has no marker was accepted when it ran and is not checked again, so recorded
histories replay after a key is rotated out and after their tokens expired; a run with the
marker is refused again the same way.

Runs started by a workflow (child workflows, continue-as-new) carry the starter's header on
(the outbound interceptor copies it). Their credential is checked again, except its expiry:
a long ingest or a watcher that continues as new after the token's lifetime is still the
job its caller was allowed to start.

Token issuers (the CLI, the demo, an HTTP front end) hold the private key
(``MMRAG_AUTH_SIGNING_KEY_FILE`` or ``MMRAG_AUTH_SIGNING_KEY``); ``mmrag stack up`` creates
one for the local stack under ``state_dir/auth/``. A client built by
``workers.temporal_client.connect()`` attaches ``MMRAG_AUTH_TOKEN``, or mints a short-lived
operator token from the signing key when one is configured (:func:`client_credentials`).

One module of ~790 lines: issuing, carrying and checking a credential are one protocol
(the token format, the header, the refusal marker), and a change to one side breaks the
others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import (
    CreateScheduleInput,
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    StartWorkflowInput,
    StartWorkflowUpdateWithStartInput,
    WorkflowHandle,
    WorkflowUpdateHandle,
)
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.client import OutboundInterceptor as ClientOutbound
from temporalio.common import RetryPolicy
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import (
    ContinueAsNewInput,
    ExecuteWorkflowInput,
    Interceptor,
    StartChildWorkflowInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from settings import Settings
from workflows.contracts import (
    ASK_WORKFLOW,
    FORGET_WORKFLOW,
    INGEST_ASSET_WORKFLOW,
    INGEST_BATCH_WORKFLOW,
    WATCH_PREFIX_WORKFLOW,
)

log = logging.getLogger("mmrag.auth")

HEADER = "mmrag_auth"  # the Temporal workflow header that carries the credential
ALGORITHM = "EdDSA"
READER, WRITER, OPERATOR = "reader", "writer", "operator"
ROLES = (READER, WRITER, OPERATOR)  # each includes the ones before it
ALL_TENANTS = "*"  # operators only
UNAUTHORIZED = "Unauthorized"  # ApplicationError type of a refused run
AUDIT_REFUSAL = "audit_refusal"  # the local activity that records a refusal
REFUSED_MARKER = "mmrag-auth-refused"  # patch marker: this run was refused (replays refuse)
SIGNING_KEY_FILE = "signing_key.pem"
VERIFY_KEYS_FILE = "verify_keys.json"

# The role each workflow type needs; any other type (Reindex, schedules, RBAC set-up, and
# workflows added later) needs an operator until it is listed here.
WORKFLOW_ROLES: dict[str, str] = {
    ASK_WORKFLOW: READER,
    INGEST_BATCH_WORKFLOW: WRITER,
    INGEST_ASSET_WORKFLOW: WRITER,
    WATCH_PREFIX_WORKFLOW: WRITER,
    FORGET_WORKFLOW: WRITER,
}


def required_role(workflow_type: str) -> str:
    return WORKFLOW_ROLES.get(workflow_type, OPERATOR)


class CredentialError(ValueError):
    """A credential that proves nothing; the message is one line saying what to fix."""


# -- keys -------------------------------------------------------------------------------------
def kid_for(public_key: Ed25519PublicKey) -> str:
    """A key's id: a fingerprint of its public key, so a key file needs no separate id."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, atomically (never a moment with 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_verify_key(keys_file: Path, public_key: Ed25519PublicKey) -> str:
    """Add a public key to a verification keys file (kept keys stay: rotation)."""
    keys = _read_keys_json(keys_file) if keys_file.exists() else {}
    kid = kid_for(public_key)
    keys[kid] = public_pem(public_key)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = keys_file.with_name(f".{keys_file.name}.tmp")
    tmp.write_text(json.dumps(keys, indent=2) + "\n")
    os.replace(tmp, keys_file)
    return kid


def generate_signing_key(directory: Path) -> str:
    """A new Ed25519 signing key: ``signing_key.pem`` (0600, replacing any older one) and its
    public key added to ``verify_keys.json`` next to it (older keys stay until removed, so
    tokens they signed keep working while they rotate out). Returns the key id."""
    directory = Path(directory)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(directory / SIGNING_KEY_FILE, pem)
    return add_verify_key(directory / VERIFY_KEYS_FILE, key.public_key())


def ensure_signing_key(directory: Path) -> str:
    """The local stack's signing key, created on first use (``mmrag stack up``)."""
    path = Path(directory) / SIGNING_KEY_FILE
    if not path.exists():
        return generate_signing_key(Path(directory))
    key, kid = load_signing_key(path.read_bytes(), str(path))
    keys_file = Path(directory) / VERIFY_KEYS_FILE
    if kid not in (_read_keys_json(keys_file) if keys_file.exists() else {}):
        add_verify_key(keys_file, key.public_key())
    return kid


def load_signing_key(pem: bytes | str, where: str) -> tuple[Ed25519PrivateKey, str]:
    """(private key, key id) from PEM text; ``where`` names its source in errors, never the
    key itself."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CredentialError(
            f"{where} is not an unencrypted PEM private key ({type(e).__name__}): create one "
            "with `mmrag token keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError(
            f"{where} is not an Ed25519 key: create one with `mmrag token keygen`"
        )
    return key, kid_for(key.public_key())


def _read_keys_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CredentialError(
            f"cannot read the verification keys file {path} ({type(e).__name__}): set "
            "MMRAG_AUTH_VERIFY_KEYS_FILE to a JSON object {key id: public key PEM}"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise CredentialError(
            f"{path} is not a JSON object {{key id: public key PEM}} (MMRAG_AUTH_VERIFY_KEYS_FILE)"
        )
    return data


def load_verify_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Verification keys by id from a JSON file ``{kid: public PEM}``. A key whose PEM does
    not match its id is refused (a typo would otherwise make every token "unknown")."""
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, pem in _read_keys_json(path).items():
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except ValueError:
            raise CredentialError(f"{path}: key {kid!r} is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise CredentialError(f"{path}: key {kid!r} is not an Ed25519 public key")
        keys[kid] = key
    return keys


def verify_keys_path(settings: Settings) -> Path:
    return Path(settings.auth_verify_keys_file or settings.state_dir / "auth" / VERIFY_KEYS_FILE)


def signing_key_from_settings(settings: Settings) -> tuple[Ed25519PrivateKey, str] | None:
    """The token issuer's key: ``MMRAG_AUTH_SIGNING_KEY`` (PEM text), else
    ``MMRAG_AUTH_SIGNING_KEY_FILE``, else the local stack's ``state_dir/auth`` key if present."""
    inline = settings.auth_signing_key.get_secret_value()
    if inline:
        return load_signing_key(inline, "MMRAG_AUTH_SIGNING_KEY")
    if settings.auth_signing_key_file:
        path = Path(settings.auth_signing_key_file)
        try:
            return load_signing_key(path.read_bytes(), f"MMRAG_AUTH_SIGNING_KEY_FILE={path}")
        except OSError as e:
            raise CredentialError(
                f"cannot read MMRAG_AUTH_SIGNING_KEY_FILE={path} ({e.strerror})"
            ) from None
    local = settings.state_dir / "auth" / SIGNING_KEY_FILE
    if local.exists():
        return load_signing_key(local.read_bytes(), str(local))
    return None


# -- tokens -----------------------------------------------------------------------------------
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_ttl(text: str) -> timedelta:
    """``15m``, ``2h``, ``30s``, ``7d`` or plain seconds."""
    match = _TTL.match(text)
    if not match:
        raise ValueError(f"--ttl {text!r}: write a duration like 15m, 2h, 30s or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    ttl = timedelta(seconds=float(match.group(1)) * unit)
    if ttl <= timedelta(0):
        raise ValueError(f"--ttl {text!r}: must be longer than zero")
    return ttl


def _epoch(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    return now.timestamp() if isinstance(now, datetime) else float(now)


def _check_claims(tenants: Sequence[str], role: str) -> None:
    if role not in ROLES:
        raise CredentialError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not tenants:
        raise CredentialError("a credential names at least one tenant")
    for tenant in tenants:
        if not isinstance(tenant, str) or not tenant:
            raise CredentialError(f"tenant {tenant!r}: tenants are non-empty strings")
    if ALL_TENANTS in tenants and role != OPERATOR:
        raise CredentialError(f"tenant '{ALL_TENANTS}' (every tenant) is for operators only")


def issue_token(
    signing_key: Ed25519PrivateKey,
    kid: str,
    tenants: Sequence[str],
    role: str,
    ttl: timedelta | float,
    subject: str = "",
    now: datetime | float | None = None,
) -> str:
    """A signed credential for ``tenants`` at ``role``, valid for ``ttl``."""
    tenants = list(dict.fromkeys(tenants))
    _check_claims(tenants, role)
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if seconds <= 0:
        raise CredentialError("a credential's lifetime must be longer than zero")
    issued = int(_epoch(now))
    claims = {
        "tenants": tenants,
        "role": role,
        "iat": issued,
        "exp": issued + max(1, round(seconds)),
        "sub": subject,
    }
    return jwt.encode(claims, signing_key, algorithm=ALGORITHM, headers={"kid": kid})


@dataclass(frozen=True)
class Credential:
    """What a verified token proves."""

    tenants: tuple[str, ...]
    role: str
    expires_at: float
    issued_at: float
    subject: str = ""
    kid: str = ""

    def allows(self, tenant: str, role: str) -> bool:
        return self.refusal(tenant, role) is None

    def refusal(self, tenant: str, role: str, what: str = "this") -> str | None:
        """Why this credential may not act on ``tenant`` at ``role`` (None: it may)."""
        if ROLES.index(self.role) < ROLES.index(role):
            return (
                f"{what} needs role {role}; the credential has role {self.role}: "
                f"issue one with `mmrag token issue --role {role}`"
            )
        if self.role == OPERATOR or tenant in self.tenants:
            return None
        named = ", ".join(self.tenants)
        return (
            f"the credential is for tenant(s) {named}, not {tenant!r}: issue one with "
            f"`mmrag token issue --tenant {tenant or 'TENANT'}`"
        )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unverified_kid(token: str) -> str:
    """The key id a token claims (for messages and audit rows; proves nothing)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid", "")
    except jwt.PyJWTError:
        return ""
    return kid if isinstance(kid, str) and len(kid) <= 64 else ""


def verify_token(
    token: str,
    verify_keys: Mapping[str, Ed25519PublicKey],
    now: datetime | float | None = None,
    *,
    check_expiry: bool = True,
) -> Credential:
    """The credential a token proves, or :class:`CredentialError` saying what to fix.

    Time is ``now`` (workflow time inside a workflow), never the clock PyJWT would read.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise CredentialError(
            "the mmrag_auth header is not a signed token: issue one with `mmrag token issue`"
        ) from None
    kid = header.get("kid")
    if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid:
        raise CredentialError(
            f"the credential is not an {ALGORITHM} token with a key id (alg "
            f"{str(header.get('alg'))[:16]!r}): issue one with `mmrag token issue`"
        )
    key = verify_keys.get(kid)
    if key is None:
        raise CredentialError(
            f"unknown key id {kid[:64]!r}: issue a token with a current signing key, or add its "
            "public key to the workers' MMRAG_AUTH_VERIFY_KEYS_FILE"
        )
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,  # checked below against the caller's time
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "require": ["exp", "iat", "role", "tenants"],
            },
        )
    except jwt.InvalidSignatureError:
        raise CredentialError(
            f"bad signature: the credential was not signed by key {kid!r}; issue a new one "
            "with `mmrag token issue`"
        ) from None
    except jwt.PyJWTError as e:
        raise CredentialError(
            f"the credential is malformed ({type(e).__name__}): issue a new one with "
            "`mmrag token issue`"
        ) from None
    tenants, role, exp, iat = claims["tenants"], claims["role"], claims["exp"], claims["iat"]
    if not isinstance(tenants, list) or not isinstance(exp, int | float):
        raise CredentialError("the credential's claims are malformed: issue a new one")
    _check_claims(tenants, role)
    if check_expiry and _epoch(now) >= exp:
        raise CredentialError(
            f"the credential expired at {_iso(exp)}: issue a new one with `mmrag token issue`"
        )
    subject = claims.get("sub", "")
    return Credential(
        tenants=tuple(tenants),
        role=role,
        expires_at=float(exp),
        issued_at=float(iat) if isinstance(iat, int | float) else 0.0,
        subject=subject[:255] if isinstance(subject, str) else "",
        kid=kid,
    )


# -- the header -------------------------------------------------------------------------------
_PLAIN = PayloadConverter.default


def token_payload(token: str) -> Payload:
    """The header value: a JSON string, as ``temporal workflow start --headers
    'mmrag_auth="<token>"'`` and the TypeScript starter write it."""
    return _PLAIN.to_payloads([token])[0]


def token_from_payload(payload: Payload | None) -> str:
    if payload is None:
        return ""
    try:
        value = _PLAIN.from_payloads([payload], [str])[0]
    except Exception:
        raise CredentialError(
            'the mmrag_auth header is not a JSON string: send the token as mmrag_auth="<token>"'
        ) from None
    if not isinstance(value, str):
        raise CredentialError(
            'the mmrag_auth header is not a JSON string: send the token as mmrag_auth="<token>"'
        )
    return value


# -- clients ----------------------------------------------------------------------------------
class ClientCredentials:
    """Where a client's tokens come from: a ready token (``MMRAG_AUTH_TOKEN``), or tokens
    minted from the issuer's signing key (short-lived operator tokens for starts; schedule
    actions get ``MMRAG_AUTH_SCHEDULE_TTL_DAYS``, since a schedule starts runs long after it
    was created)."""

    def __init__(
        self,
        token: str = "",
        signing_key: tuple[Ed25519PrivateKey, str] | None = None,
        *,
        tenants: Sequence[str] = (ALL_TENANTS,),
        role: str = OPERATOR,
        ttl: timedelta = timedelta(minutes=15),
        schedule_ttl: timedelta = timedelta(days=365),
        subject: str = "mmrag-client",
    ) -> None:
        if not token and signing_key is None:
            raise ValueError("ClientCredentials needs a token or a signing key")
        self._token = token
        self._signing_key = signing_key
        self._claims = (list(tenants), role, subject)
        self._ttl, self._schedule_ttl = ttl, schedule_ttl
        self._minted: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def token(self) -> str:
        """The token for a workflow start; a minted one is reused until half its life."""
        if self._token:
            return self._token
        with self._lock:
            now = time.time()
            if self._minted is None or now >= self._minted[1]:
                self._minted = (
                    self._mint(self._ttl, now),
                    now + self._ttl.total_seconds() / 2,
                )
            return self._minted[0]

    def schedule_token(self) -> str:
        return self._token or self._mint(self._schedule_ttl, time.time())

    def _mint(self, ttl: timedelta, now: float) -> str:
        assert self._signing_key is not None
        key, kid = self._signing_key
        tenants, role, subject = self._claims
        return issue_token(key, kid, tenants, role, ttl, subject=subject, now=now)


def client_credentials(
    settings: Settings,
    *,
    tenants: Sequence[str] = (ALL_TENANTS,),
    role: str = OPERATOR,
    subject: str = "mmrag-client",
) -> ClientCredentials | None:
    """A client's credentials from settings: ``MMRAG_AUTH_TOKEN``, else tokens minted from
    the signing key (``MMRAG_AUTH_SIGNING_KEY[_FILE]`` or the local stack's) with these
    claims (operator of every tenant by default: the CLI of the person holding the key; a
    long-running service narrows them), else none (the workers then refuse, saying so)."""
    token = settings.auth_token.get_secret_value()
    if token:
        return ClientCredentials(token)
    key = signing_key_from_settings(settings)
    if key is None:
        return None
    return ClientCredentials(
        signing_key=key,
        tenants=tenants,
        role=role,
        subject=subject,
        ttl=timedelta(seconds=settings.auth_client_token_ttl_s),
        schedule_ttl=timedelta(days=settings.auth_schedule_token_ttl_days),
    )


class AuthClientInterceptor(ClientInterceptor):
    """Attaches the ``mmrag_auth`` header to workflow starts (signal-with-start included),
    update-with-start and schedule creation. A header the caller set already is kept."""

    def __init__(self, credentials: ClientCredentials) -> None:
        self.credentials = credentials

    def intercept_client(self, next: ClientOutbound) -> ClientOutbound:
        return _AuthClientOutbound(next, self.credentials)


def _with_token(
    headers: Mapping[str, Payload] | None, token: Callable[[], str]
) -> dict[str, Payload]:
    merged = dict(headers or {})
    if HEADER not in merged:
        merged[HEADER] = token_payload(token())
    return merged


class _AuthClientOutbound(ClientOutbound):
    def __init__(self, next: ClientOutbound, credentials: ClientCredentials) -> None:
        super().__init__(next)
        self._credentials = credentials

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        input.headers = _with_token(input.headers, self._credentials.token)
        return await super().start_workflow(input)

    async def start_update_with_start_workflow(
        self, input: StartWorkflowUpdateWithStartInput
    ) -> WorkflowUpdateHandle[Any]:
        start = input.start_workflow_input
        start.headers = _with_token(start.headers, self._credentials.token)
        return await super().start_update_with_start_workflow(input)

    async def create_schedule(self, input: CreateScheduleInput) -> ScheduleHandle:
        action = input.schedule.action
        if isinstance(action, ScheduleActionStartWorkflow):
            action.headers = _with_token(action.headers, self._credentials.schedule_token)
        return await super().create_schedule(input)


# -- workers ----------------------------------------------------------------------------------
@dataclass
class Refusal:
    """A refused run, as audited: never the token, only what it claimed."""

    tenant: str
    workflow_type: str
    required_role: str
    reason: str
    kid: str = ""
    subject: str = ""
    role: str = ""


@dataclass
class AuthPolicy:
    """What a worker checks: its verification keys, and whether a credential is required."""

    verify_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    required: bool = True

    def check(
        self,
        token: str,
        workflow_type: str,
        args: Sequence[Any],
        now: datetime | float,
        *,
        chained: bool = False,
    ) -> Refusal | None:
        """None when the run may go on, else the refusal to audit and raise."""
        role = required_role(workflow_type)
        tenant = getattr(args[0], "tenant", None) if args else None
        claimed = tenant if isinstance(tenant, str) else ""
        if not token:
            if not self.required:
                return None
            return Refusal(
                claimed,
                workflow_type,
                role,
                f"no credential: start {workflow_type} with the {HEADER} header, a token from "
                f"`mmrag token issue --tenant {claimed or 'TENANT'} --role {role}` "
                "(mmrag clients read MMRAG_AUTH_TOKEN)",
            )
        try:
            cred = verify_token(token, self.verify_keys, now, check_expiry=not chained)
        except CredentialError as e:
            return Refusal(claimed, workflow_type, role, str(e), kid=unverified_kid(token))
        if not isinstance(tenant, str) and cred.role != OPERATOR:
            reason: str | None = (
                f"{workflow_type}'s input names no tenant: only operators may start it"
            )
        else:
            reason = cred.refusal(claimed, role, what=workflow_type)
        if reason is None:
            return None
        return Refusal(
            claimed, workflow_type, role, reason, kid=cred.kid, subject=cred.subject, role=cred.role
        )


def policy_from_settings(settings: Settings) -> AuthPolicy:
    """The worker's policy. With a credential required and no verification keys the worker
    would refuse everything, so it does not start: say which setting to fix."""
    path = verify_keys_path(settings)
    if path.exists():
        keys = load_verify_keys(path)
    elif settings.auth_verify_keys_file:
        raise CredentialError(f"MMRAG_AUTH_VERIFY_KEYS_FILE={path} does not exist")
    else:
        keys = {}
    if settings.auth_required and not keys:
        raise CredentialError(
            f"no verification keys in {path}: run `mmrag stack up` (local stack) or set "
            "MMRAG_AUTH_VERIFY_KEYS_FILE to the issuers' public keys "
            "(MMRAG_AUTH_REQUIRED=false turns the check off)"
        )
    return AuthPolicy(keys, settings.auth_required)


AUDIT_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)


class AuthInterceptor(Interceptor):
    """Checks ``mmrag_auth`` before workflow code runs and carries it on to child workflows
    and continue-as-new. Register it on every worker that runs workflows, with
    :class:`AuthAudit`'s ``audit_refusal`` activity, and on replayers."""

    def __init__(self, policy: AuthPolicy) -> None:
        inbound = type("AuthWorkflowInbound", (_AuthWorkflowInbound,), {"policy": policy})
        self._inbound: type[WorkflowInboundInterceptor] = inbound

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        return self._inbound


class _AuthWorkflowInbound(WorkflowInboundInterceptor):
    policy: AuthPolicy

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        self._outbound = _AuthWorkflowOutbound(outbound)
        super().init(self._outbound)

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        payload = input.headers.get(HEADER)
        self._outbound.header = payload
        if workflow.unsafe.is_replaying():
            # Trust the history: the run was checked when it ran. Only a recorded refusal
            # is repeated (keys and clocks may have moved since).
            if not workflow.patched(REFUSED_MARKER):
                return await super().execute_workflow(input)
            refusal = Refusal("", workflow.info().workflow_type, "", "refused when it ran")
        else:
            info = workflow.info()
            # PyJWT and cryptography are real modules, never the sandbox's copies (cryptography
            # imports its exceptions lazily, from Rust: a sandboxed import there aborts).
            with workflow.unsafe.imports_passed_through(), workflow.unsafe.sandbox_unrestricted():
                try:
                    token = token_from_payload(payload)
                except CredentialError as e:
                    refused: Refusal | None = Refusal("", info.workflow_type, "", str(e))
                else:
                    refused = self.policy.check(
                        token,
                        info.workflow_type,
                        input.args,
                        workflow.now(),
                        chained=bool(info.parent or info.continued_run_id),
                    )
            if refused is None:
                return await super().execute_workflow(input)
            refusal = refused
            workflow.patched(REFUSED_MARKER)
        try:
            await workflow.execute_local_activity(
                AUDIT_REFUSAL,
                refusal,
                start_to_close_timeout=timedelta(seconds=10),
                schedule_to_close_timeout=timedelta(seconds=60),
                retry_policy=AUDIT_RETRY,
                summary="audit the refused credential",
            )
        except ActivityError as e:  # the run is refused all the same
            workflow.logger.warning("refusal not audited: %s", e.cause or e)
        raise ApplicationError(
            f"unauthorized: {refusal.reason}", type=UNAUTHORIZED, non_retryable=True
        )


class _AuthWorkflowOutbound(WorkflowOutboundInterceptor):
    """Carries the run's credential on: runs it starts act for the same caller."""

    header: Payload | None = None

    def _carry(self, headers: Mapping[str, Payload]) -> Mapping[str, Payload]:
        if self.header is None or HEADER in headers:
            return headers
        return {**headers, HEADER: self.header}

    def start_child_workflow(self, input: StartChildWorkflowInput) -> Any:
        input.headers = self._carry(input.headers)
        return super().start_child_workflow(input)

    def continue_as_new(self, input: ContinueAsNewInput) -> Any:
        input.headers = self._carry(input.headers)
        return super().continue_as_new(input)


class AuthAudit:
    """The ``audit_refusal`` activity: one audit row per refused run, keyed by the run so a
    retry writes it once. It holds what the credential claimed, never the token."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @activity.defn(name=AUDIT_REFUSAL)
    def audit_refusal(self, refusal: Refusal) -> None:
        from sqlalchemy.orm import Session

        from activities.runtime.run_context import workflow_ids
        from activities.store.registry import AuditRecord, get_engine, write_audit

        workflow_id, run_id = workflow_ids()
        engine = get_engine(self._settings.database_endpoint())
        record = AuditRecord(
            tenant=refusal.tenant[:128],
            action="unauthorized",
            idempotency_key=f"unauthorized/{workflow_id}/{run_id}",
            workflow_id=workflow_id,
            run_id=run_id,
            actor=refusal.subject[:255],
            details={
                "workflow_type": refusal.workflow_type,
                "required_role": refusal.required_role,
                "credential_role": refusal.role,
                "kid": refusal.kid,
                "reason": refusal.reason,
            },
        )
        with Session(engine) as session, session.begin():
            write_audit(session, [record])
        log.warning(
            "refused %s %s for tenant %r: %s",
            refusal.workflow_type,
            workflow_id,
            refusal.tenant,
            refusal.reason,
        )
