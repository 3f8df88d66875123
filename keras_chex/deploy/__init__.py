"""Shipping a compact model: TFLite / SavedModel export and LiteRT latency."""
