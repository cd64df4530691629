"""The embedded toy world: synthetic concepts, a tiny SD-shaped base model trained on them, a classifier
that reads its images, and the evaluation that tells whether a method learned a concept."""
