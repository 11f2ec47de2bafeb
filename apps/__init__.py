"""Applications built on the public clipguide API."""
