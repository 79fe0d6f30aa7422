"""Survivors (subjects) and the agencies' own references to them."""
