"""Modality encoders: image (ViT), video frames, speech (Conformer), and their pre-training objectives."""
