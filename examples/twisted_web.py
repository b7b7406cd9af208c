"""twisted.web serving a directory over TLS, the certificate's OCSP response stapled.

    python examples/twisted_web.py CHAIN.pem KEY.pem [DIR [PORT]]   # https://localhost:8443/

CHAIN.pem: the certificate, then its issuer. Listening once ``options.start()`` has fired
staples the first handshake. The same with no code, on any reactor:
``twistd -n web --listen staple:8443:certKey=CHAIN.pem:privateKey=KEY.pem --path DIR``.
"""

import argparse

from twisted.internet import reactor
from twisted.web import server, static

import staple.twisted

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for name, default in (("chain", None), ("key", None), ("dir", "."), ("port", "8443")):
    parser.add_argument(name, nargs="?" if default else None, default=default)
args = parser.parse_args()
options = staple.twisted.server_options([(args.chain, args.key)], store=staple.FileStore(".cache"))


def listen(_: None) -> None:
    port = reactor.listenSSL(int(args.port), server.Site(static.File(args.dir)), options)
    print(f"serving {args.dir} on https://localhost:{port.getHost().port}/", flush=True)


options.start().addCallback(listen)
reactor.run()
