"""The project's one error tree.

Two branches that callers must never confuse:

* :class:`InvalidDataError` -- the data itself is wrong (a malformed CPID, a bad
  signature, an expired certificate, a name outside a namespace).  Retrying will
  not help; services answer 4xx.
* :class:`RetrievalError` -- the data could not be fetched or stored (the index is
  down, a call timed out).  Retrying may help; services answer 503.

Messages say what was found and what was expected.

Each class carries ``code`` (the ``error.code`` of an HTTP answer) and ``http_status``
(the status every service answers it with); a subclass inherits both unless it says
otherwise, so the most specific class decides.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLargeError",
    "CPIError",
    "ChainError",
    "CheckpointError",
    "ConfigError",
    "ConflictError",
    "EnvelopeError",
    "ExpiredError",
    "IndexTimeoutError",
    "IndexUnavailableError",
    "InvalidCPIDError",
    "InvalidDataError",
    "KeyFileError",
    "LogConsistencyError",
    "NotFoundError",
    "OutsideNamespaceError",
    "PayloadError",
    "ProofError",
    "RequestTimeoutError",
    "RetrievalError",
    "RevokedError",
    "SignatureError",
]


class CPIError(Exception):
    """Root of every error this project raises on purpose."""

    code = "error"
    http_status = 500
    retryable = False
    """Whether the same call may succeed later without anything being fixed first."""


# -- bad data -----------------------------------------------------------------


class InvalidDataError(CPIError):
    """The input is wrong; retrying the same input cannot succeed."""

    code = "invalid"
    http_status = 400


class InvalidCPIDError(InvalidDataError, ValueError):
    """A CPID (or one of its parts) does not follow docs/protocol.md §1."""

    code = "invalid_cpid"

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid CPID {text!r}: {reason}")


class KeyFileError(InvalidDataError):
    """A key file is malformed or has unsafe permissions."""

    code = "invalid_key"


class EnvelopeError(InvalidDataError):
    """A DSSE envelope is malformed (not JSON, missing fields, bad base64)."""

    code = "invalid_envelope"


class SignatureError(InvalidDataError):
    """No signature in the envelope verifies under the expected key."""

    code = "bad_signature"


class PayloadError(InvalidDataError):
    """The signed payload is not a valid document of the expected type."""

    code = "invalid_payload"


class ChainError(InvalidDataError):
    """A record or certificate chain failed one of the five rules of docs/protocol.md §2–5.

    ``rule`` is the rule number (1-5) and ``link`` the position in the chain
    (0 = the record itself, 1 = the signer's certificate, ...).
    """

    code = "chain_invalid"

    def __init__(self, message: str, *, rule: int, link: int, reason: str) -> None:
        self.rule = rule
        self.link = link
        self.reason = reason
        super().__init__(message)


class ExpiredError(ChainError):
    """Something is outside its validity window (rule 3)."""

    code = "expired"


class RevokedError(ChainError):
    """A certificate serial or key in the chain is revoked (rule 4)."""

    code = "revoked"


class OutsideNamespaceError(InvalidDataError):
    """A name lies outside the namespace that was supposed to contain it."""

    code = "outside_namespace"
    http_status = 403


class ConfigError(InvalidDataError):
    """A service configuration (file, environment or flags) is missing, unreadable or invalid."""

    code = "invalid_config"


class ConflictError(InvalidDataError):
    """The request contradicts existing state (e.g. a serial collision)."""

    code = "conflict"
    http_status = 409


class NotFoundError(InvalidDataError):
    """The named thing does not exist."""

    code = "not_found"
    http_status = 404


class BodyTooLargeError(InvalidDataError):
    """A request body is larger than the service accepts (``max_body_bytes``)."""

    code = "body_too_large"
    http_status = 413


class RequestTimeoutError(InvalidDataError):
    """The request body did not arrive in time (HTTP 408); the connection is closed."""

    code = "request_timeout"
    http_status = 408


class ProofError(InvalidDataError):
    """A Merkle inclusion or consistency proof does not verify (RFC 9162 section 2.1)."""

    code = "bad_proof"


class CheckpointError(InvalidDataError):
    """A signed note or checkpoint is malformed or carries no valid trusted signature."""

    code = "bad_checkpoint"


class LogConsistencyError(InvalidDataError):
    """The transparency log's history contradicts what was seen or signed before.

    ``kind`` says how: ``"rewritten"`` (an entry below a signed size changed or
    vanished), ``"rollback"`` (a smaller tree than one already seen), ``"split_view"``
    (two different roots for one size, or no consistency between two checkpoints),
    ``"gap"`` (the audit stream skips a sequence number).
    """

    code = "log_inconsistent"

    def __init__(self, message: str, *, kind: str) -> None:
        self.kind = kind
        super().__init__(message)


# -- retrieval ----------------------------------------------------------------


class RetrievalError(CPIError):
    """Data could not be read or written; the same call may succeed later."""

    code = "unavailable"
    http_status = 503
    retryable = True


class IndexUnavailableError(RetrievalError):
    """The etcd index could not be reached."""

    code = "index_unavailable"


class IndexTimeoutError(RetrievalError):
    """A call to the etcd index did not finish in time."""

    code = "index_timeout"
