"""Safety signals computed on stored CLIP image embeddings: published heads converted to safetensors and scored."""
