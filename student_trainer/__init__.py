"""The student trainer (on-policy GKD against the teacher service).

Not built yet: it is the next part of the project (losses, rollouts, training loop).
This package exists so that the distribution's layout is fixed from the start.
"""
