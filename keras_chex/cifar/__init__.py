"""CIFAR-10 helpers for examples, tests and benchmarks: data and ResNets."""
