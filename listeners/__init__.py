"""Listeners turn network connections into connections of the broker core."""
