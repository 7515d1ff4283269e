"""The network: building and loading the T5, its loss and generation, where a model comes from,
and its size."""
