"""Channel pruning methods, one subpackage each."""
