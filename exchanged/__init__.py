"""exchanged: PKI and secure document exchange between units, keys held on PKCS#11 tokens."""

__version__ = "0.1.0"
