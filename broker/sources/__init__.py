"""Where survivors' records come from: fetched live from a holding agency's records endpoint
(``endpoint``) or deposited with the broker and kept encrypted per survivor (``held``)."""
