"""Storage backends behind one small interface (base.py)."""
