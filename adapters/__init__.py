"""Adapters that join encoders to the language model: gated cross-attention, video aggregator, speech adapter."""
