"""Processes and devices: data-parallel launch detection and document sharding."""
