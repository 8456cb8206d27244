"""Zero trust: TLS with client certificates per role (pki.py); more to come in 4/6."""
