"""Segmentation backends and model weights management."""
