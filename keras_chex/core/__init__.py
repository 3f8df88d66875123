"""The method-neutral core every pruning method builds on.

- `_graph`: the only module that touches private Keras internals (graph
  traversal, layer cloning);
- `layer_rules`: how each layer type moves, mixes and owns channels;
- `analysis`: channel groups found from the graph (`ModelAnalysis`);
- `masking`, `wrapping`: mask-carrying layers and the wrapped model;
- `counting`, `costs`: MACs / parameter counts and their closed form;
- `stripping`: the compact plain Keras model;
- `method`, `callback`: what a pruning method plugs into (state base,
  target validation, the `fit` callback base).
"""
