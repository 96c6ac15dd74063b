"""Adapters: each a small preparation step over the engine (``AdapterLayer`` and its subclasses), their configs and the one registry."""
