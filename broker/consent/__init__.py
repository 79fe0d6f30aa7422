"""Consent grants held as immutable, versioned policies."""
