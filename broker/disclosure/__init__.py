"""The disclosure path: decide, fetch, minimise, sign and encrypt, record."""
