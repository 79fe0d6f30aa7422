"""Agencies and their clients (credentials): the admin's domain."""
