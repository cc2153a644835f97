"""Persistent state: SQLite schemas and queries."""
