"""Thin adapters onto engines that exist (optional extras)."""
