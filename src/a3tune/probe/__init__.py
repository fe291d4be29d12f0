"""Stage probe_heads: rank the attention heads of a Med-LVLM by attention on the image."""
