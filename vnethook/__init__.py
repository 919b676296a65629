"""vnethook: publish ports of libvirt NAT guests, in the firewall libvirt itself uses."""

__version__ = "0.1.0"
