"""The ``staple:`` server endpoint string, found by Twisted's plugin system.

``staple:PORT:certKey=CHAIN.pem:privateKey=KEY.pem[:interface=IP][:cacheDir=DIR]`` serves TLS
with OCSP stapling, e.g. ``twistd -n web --listen staple:8443:certKey=...`` or ``daphne -e
staple:8443:...``. Twisted imports every plugin module to list plugins, so this one imports
staple only when a ``staple:`` string is parsed. See :func:`staple.twisted.parse_endpoint`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class StapleEndpointParser:
    prefix = "staple"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:
        from staple.twisted import parse_endpoint

        return parse_endpoint(reactor, *args, **kwargs)


staple = StapleEndpointParser()
