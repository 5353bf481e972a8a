"""The CPI contract: identifiers, signed documents and chain verification. No I/O.

Import the pieces from their modules (``schemas.cpid``, ``schemas.dsse``,
``schemas.models``, ``schemas.chain``, ``schemas.keys``, ``schemas.errors``);
the most used names are re-exported here.
"""

from schemas.chain import ChainResult, TrustAnchors, require_record, verify_chain, verify_record
from schemas.cpid import CPID, derive, ns_contains, parse, parse_namespace
from schemas.dsse import Envelope, sign, verify
from schemas.errors import CPIError, InvalidDataError, RetrievalError
from schemas.models import Anchor, Cert, Deregister, Record, Register, Revocation, Status

__all__ = [
    "CPID",
    "Anchor",
    "CPIError",
    "Cert",
    "ChainResult",
    "Deregister",
    "Envelope",
    "InvalidDataError",
    "Record",
    "Register",
    "RetrievalError",
    "Revocation",
    "Status",
    "TrustAnchors",
    "derive",
    "ns_contains",
    "parse",
    "parse_namespace",
    "require_record",
    "sign",
    "verify",
    "verify_chain",
    "verify_record",
]
