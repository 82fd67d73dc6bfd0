"""Sweeps over config fields: presets, planning, execution and fine-tuned points."""
