"""Tables and figures from results/ files (no torch, no runner)."""
