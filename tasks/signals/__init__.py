"""Safety signals computed from a stored CLIP image embedding."""
