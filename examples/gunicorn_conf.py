r"""gunicorn settings for OCSP stapling: staple's worker class does the TLS.

    CERTFILE=chain.pem KEYFILE=key.pem \
        gunicorn -c examples/gunicorn_conf.py examples.uvicorn_app:app

For an aiohttp app (``module:app``, an ``aiohttp.web.Application``) use
``worker_class = "staple.gunicorn.AiohttpWorker"``. Every worker keeps its own stapler over the
store ``staple serve`` uses: ``STAPLE_STORE=redis://...`` for a fleet, else ``STAPLE_CACHE_DIR``,
else ``~/.cache/staple``.
"""

import os

bind = os.environ.get("BIND", "0.0.0.0:8443")
workers = int(os.environ.get("WORKERS", "2"))
worker_class = "staple.gunicorn.UvicornWorker"
certfile = os.environ.get("CERTFILE", "chain.pem")  # the chain, leaf first
keyfile = os.environ.get("KEYFILE", "key.pem")
