"""Shared fixtures: tests import the model builders from this folder."""
