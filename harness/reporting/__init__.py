"""Reporting from results/ files alone: the one reader (results.py), tables and figures; no torch or runner."""
