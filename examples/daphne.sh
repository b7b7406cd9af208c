#!/bin/sh
# Daphne (Django Channels' ASGI server) with OCSP stapling and no code: the staple: endpoint is
# a Twisted plugin that `pip install 'ocsp-staple[twisted]' daphne` installs.
#
#   sh examples/daphne.sh CHAIN.pem KEY.pem project.asgi:application   # https://localhost:8443/
#
# CHAIN.pem is the certificate, then its issuer. Daphne runs Twisted's asyncio reactor, and the
# responses refresh on its loop; they are cached in $XDG_CACHE_HOME/staple (`staple serve`'s
# cache) so a restart staples at once; add :cacheDir=DIR to keep them elsewhere. In endpoint
# strings a ':' or '=' inside a path must be escaped as '\:' or '\='.
set -eu
exec daphne -e "staple:8443:certKey=$1:privateKey=$2" "$3"
