"""Small shared pieces of the API layer."""
