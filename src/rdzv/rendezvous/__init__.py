"""Rendezvous: URL rendezvous (tcp://, file://, env://) and elastic rendezvous handlers."""
