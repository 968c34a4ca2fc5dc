"""Redaction of outputs written before unlearning: scoring spans through the pair and
masking, refusing or rewriting them.

May import: :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`proxy.jobs`, :mod:`proxy.protocol`
schemas and errors. Not :mod:`proxy.training`."""
