"""Tests of the transformers and Lightning bridges."""
