"""Secure transport between nodes (mutual TLS, the wire protocol). Filled by the exchange issue."""
