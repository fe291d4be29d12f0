"""Weak labels: SAM proposals, prompt-aware CLIP refinement, projection onto the vision-token grid."""
