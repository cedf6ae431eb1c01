"""Training and validating the scope model: pairs from the public training splits and the hand-written
Wikidata templates, splits that hold whole relations out, and the trainers."""
