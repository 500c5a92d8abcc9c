"""Bootstrapping condvec from a user's SD1.x / SD2.x / SDXL model: offline loading, and what the model's own text
encoders compute for the empty prompt and for each tag (the starting point of a table)."""
