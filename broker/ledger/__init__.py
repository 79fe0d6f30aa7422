"""Tamper-evident disclosure ledger: RFC 9162 Merkle tree, signed checkpoints, offline verifier."""
