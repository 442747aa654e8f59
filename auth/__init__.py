"""Authentication: the ordered chain of authenticators a CONNECT passes through."""
