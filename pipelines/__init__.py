"""Jobs built on the melo_ray library: bulk edit, scalability runs."""
