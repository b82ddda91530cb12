"""Decoding: sampling filters and the KV-cached generator, weights laid out for inference, int8,
and the native one-token step."""
