"""Consent-based inter-agency data-sharing broker."""
