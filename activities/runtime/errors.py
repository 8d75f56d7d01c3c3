"""The one base class of "this object cannot be read", whoever found out.

A missing object, a URI outside the tenant's roots, a scheme mmrag cannot read and content
that does not decode are raised by different subpackages (store, media), yet every caller
treats them alike: that asset fails (or is left out) with the message, the batch goes on,
and no retry can help. Catching this class keeps that list in one place."""

from __future__ import annotations


class UnreadableObjectError(Exception):
    """An object this worker cannot read or decode; the message says why."""
