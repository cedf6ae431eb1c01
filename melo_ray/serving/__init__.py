"""Serving: `engine.py` (what one replica does, plain and synchronous) and `app.py` (the Ray Serve HTTP app)."""
