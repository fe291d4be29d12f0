"""Converting the checkpoints users hold (original LLaVA-Med layouts) into HF Llava folders.

``converter.convert_model`` is the entry point; this package imports nothing heavy itself, so the
CLI can register ``convert_model`` without loading torch.
"""
