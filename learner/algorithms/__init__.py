"""Loss functions, registered by name; the learner is blind to which one runs."""
