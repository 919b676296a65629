"""Firewall backends. See base.py for the interface."""
