"""pymta - a Postfix-like mail system in Python."""

__version__ = "0.1.0"
