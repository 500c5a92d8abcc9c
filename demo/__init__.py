"""Synthetic demo scenes (coloured shapes with tag captions) and the detector that reads attributes back."""
