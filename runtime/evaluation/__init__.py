"""Evaluation around the serving core: runners of every backend and precision, the one
encode -> refine -> score loop behind ``runtime demo``, ``runtime parity`` and ``runtime evaluate``,
retrieval metrics, benchmarks and the synthetic data set.  Imports torch only lazily, for the
PyTorch reference rows."""
