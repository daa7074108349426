"""Test machinery that is not a fixture: the power-cut file system."""
