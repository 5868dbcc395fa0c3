"""Pretrained backbones shipped in PyPI weight packages, converted offline, and the resources they need."""
