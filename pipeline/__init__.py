"""Batch 2x restoration of thumbnails with MIMO-UNet on Ray Data."""
