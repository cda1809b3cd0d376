"""The PyTorch reference (needs torch): the original's networks with their quirks, the one reference
of the reciprocal-neighbour step, checkpoint reading and random models for tests.  Export, the
parity tools and the tests use it; nothing on the serving path imports it."""
