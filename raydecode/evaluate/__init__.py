"""Retrieval, reconstruction and classification metrics, reports and plots."""
