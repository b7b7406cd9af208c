"""Test helpers for OCSP stapling: a throwaway PKI, a local OCSP responder, a fake clock.

Everything a test needs to exercise staple, or a server built on it, without the network::

    from staple.testing import FakeClock, Fault, OcspResponder, TestPKI

    clock = FakeClock()
    pki = TestPKI(now=clock.now())  # key_type: KeyType = "ec" (or "rsa", "ed25519")
    async with OcspResponder(pki, clock=clock) as responder:
        leaf = pki.issue_leaf("example.test", ocsp_url=responder.url, must_staple=True)
        leaf.chain              # [leaf, intermediate] as cryptography certificates
        leaf.configure_pyopenssl(ssl_context)
        responder.revoke(leaf)  # or set_status(leaf, "unknown")
        responder.fault = Fault.DOWN     # or "try_later", "expired", "wrong_signer"...
        responder.fault = None
        await clock.wait_for_sleepers(1)
        clock.advance(3600)
        assert responder.requests == 1
"""

from ._clock import FakeClock
from ._pki import CA, KeyType, Leaf, TestPKI
from ._responder import Fault, OcspResponder

__all__ = ["CA", "FakeClock", "Fault", "KeyType", "Leaf", "OcspResponder", "TestPKI"]
