"""Reporting from results/ files alone: the one reader (results.py), tables, figures (differences.py: position curves
relative to vanilla, dot plots) and the self-contained results page (html.py + report.html); no torch or runner."""
