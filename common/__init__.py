"""Shared ground of every daemon: wire messages, config, logging, transport, the tiny model."""
