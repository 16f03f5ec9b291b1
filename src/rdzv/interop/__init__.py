"""Bridges to other frameworks. :mod:`rdzv.interop.torch` needs PyTorch and is imported only
on demand (nothing in rdzv's core imports it)."""
