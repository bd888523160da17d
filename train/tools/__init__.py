"""Offline tools: CompVis checkpoint converters; the scripts that train the shipped digits teacher and classifier."""
