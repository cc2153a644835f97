"""Hostile tests: each class of attack of issue 8, through real daemons, tokens and TLS."""
