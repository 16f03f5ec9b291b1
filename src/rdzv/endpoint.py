"""Endpoints (``host:port``) of stores and rendezvous: how they are written."""

from __future__ import annotations

__all__ = ["format_endpoint"]


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
