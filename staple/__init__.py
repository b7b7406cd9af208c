"""staple: OCSP stapling for Python TLS servers."""
